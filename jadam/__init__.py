"""jadam: Adam for JAX — pure functional Adam-family optimizers over pytrees.

Interchangeable with optax, fast on real pytrees (flat fused engine), and
scaling out with data-parallel and ZeRO-sharded training (``jadam.parallel``).
"""

from ._core import AdamState as AdamState
from ._core import AmsgradState as AmsgradState
from ._core import OptimizerSpec as OptimizerSpec
from ._core import init as init
from ._core import step as step
from ._core import update as update
from ._layout import FlatLayout as FlatLayout
from ._loss_scale import LossScaleState as LossScaleState
from ._optax_state import MasterState as MasterState
from ._packed import Packed as Packed
from ._quant import QArray as QArray
from ._quant import Quantized as Quantized
from ._optimizers import adam as adam
from ._optimizers_variants import adamax as adamax
from ._optimizers_variants import adamaxw as adamaxw
from ._optimizers import adamw as adamw
from ._optimizers_variants import amsgrad as amsgrad
from ._optimizers_variants import lamb as lamb
from ._optimizers import nadam as nadam
from ._optimizers import nadamw as nadamw
from ._transformation import optimizer_spec as optimizer_spec
from ._optimizers_variants import radam as radam
from ._optimizers import scale_by_adam as scale_by_adam
from ._plan import MemoryPlan as MemoryPlan
from ._plan import memory_plan as memory_plan
from ._rule import Rule as Rule
from . import checkpoint as checkpoint
from . import parallel as parallel

__version__ = "0.1.0"
