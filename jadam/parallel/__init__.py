"""Data-parallel training: one trainer over ``pmap``, ``shard_map``, ``jit``
ZeRO (``"zero1"``, ``"zero2"``: optimizer state sharded over the data
axis), FSDP (``"fsdp"``: params, gradients and state sharded), 1-bit Adam
(``OneBit(warmup_steps=W)``: compressed momentum after a warm-up) and local
steps (``LocalSteps(inner_steps=H)``, DiLoCo), on one process or many
(``jax.distributed``; :func:`initialize` joins a run in which the loss of
a process raises :class:`WorkerLostError` in the others); :func:`comm_bytes`
reads the bytes a step sends from its compiled HLO.

Usage::

  trainer = jadam.parallel.DataParallel(loss_fn, optimizer, mesh)
  params, opt_state = trainer.init(params)
  params, opt_state, loss = trainer.step(params, opt_state, batch)

A strategy is one :class:`Strategy` subclass registered by name with
:func:`register_strategy`; :class:`StepConfig` is what it is built from.
"""

from ._common import StepConfig as StepConfig
from ._common import Strategy as Strategy
from ._common import available_strategies as available_strategies
from ._common import register_strategy as register_strategy
from ._trainer import DataParallel as DataParallel
from . import _zero  # noqa: F401  (registers the "zero1" and "zero2" strategies)
from . import _fsdp  # noqa: F401  (registers the "fsdp" strategy)
from ._local import LocalSteps as LocalSteps
from ._local import LocalStepsState as LocalStepsState
from ._onebit import OneBit as OneBit
from ._onebit import OneBitState as OneBitState
from ._comm import CommReport as CommReport
from ._comm import comm_bytes as comm_bytes
from ._comm import comm_report as comm_report
from ._watchdog import WORKER_LOST_EXIT_CODE as WORKER_LOST_EXIT_CODE
from ._runtime import WorkerLostError as WorkerLostError
from ._runtime import initialize as initialize
from ._runtime import shutdown as shutdown
from ._runtime import worker_lost as worker_lost
