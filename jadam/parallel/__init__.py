"""Data-parallel training: one trainer over ``pmap``, ``shard_map`` and
``jit``, on one process or many (``jax.distributed``).

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
