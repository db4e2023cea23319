"""Memory plan: bytes per device of params, gradients and optimizer state for a
data-parallel strategy, before anything is allocated.

The numbers are those of the arrays the trainer actually makes (a test
matches them to ``addressable_shards``), ZeRO's padding included:

* **params**: every strategy here keeps a full copy of the params on each
  device of the data axis (ZeRO stages 1 and 2 shard only state and
  gradients).
* **grads**: the gradient each device keeps for its update: the full
  gradient for plain data parallelism and ZeRO stage 1 (stage 1 reduce-
  scatters it once per step); for stage 2 only the device's ``1/N`` slice of
  the reduced gradient (the accumulator, with ``accumulation_steps > 1``).
  The gradient of one backward pass is full-size in every strategy while it
  is being computed; like activations, that working memory is not counted.
  With ``accumulation_steps > 1`` the accumulator is float32 (at least).
* **opt_state**: the step count and the moments (``mu``, ``nu``, and
  ``nu_max`` for AMSGrad) in their dtypes: full for plain data parallelism,
  ``1/N`` of the padded flat buffers for ZeRO.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _compose
from . import _flat
from . import _master
from . import _quant
from . import _rule
from . import _validate as V
from ._core import moment_dtypes
from ._layout import FlatLayout
from ._layout import sharded_pad_multiple
from ._packed import Packed
from ._sharding import fsdp_spec

PLAIN_STRATEGIES = ("plain", "shard_map", "jit", "pmap")
ZERO_STRATEGIES = ("zero1", "zero2")
OWN_STATE_STRATEGIES = ("onebit", "local")
STRATEGIES = PLAIN_STRATEGIES + ZERO_STRATEGIES + ("fsdp",) + OWN_STATE_STRATEGIES


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one data-parallel configuration.

  Attributes:
    strategy: the strategy's name.
    n_devices: devices on the data axis.
    num_params: parameters in the model (elements of all leaves).
    params: bytes of params per device.
    grads: bytes of gradients per device (see :mod:`jadam._plan`).
    opt_state: bytes of optimizer state per device.
  """

  strategy: str
  n_devices: int
  num_params: int
  params: int
  grads: int
  opt_state: int

  @property
  def total(self) -> int:
    """params + grads + opt_state, bytes per device."""
    return self.params + self.grads + self.opt_state

  def per_param(self, field: str = "total") -> float:
    """Bytes per parameter per device of ``field`` (``"params"``, ``"grads"``,
    ``"opt_state"`` or ``"total"``)."""
    return getattr(self, field) / max(self.num_params, 1)

  def __str__(self) -> str:
    def fmt(b):
      return f"{b / 2**20:,.1f} MiB ({b / max(self.num_params, 1):.2f} B/param)"

    return (f"{self.strategy} on {self.n_devices} device(s), "
            f"{self.num_params:,} params, per device: params {fmt(self.params)}, "
            f"grads {fmt(self.grads)}, opt_state {fmt(self.opt_state)}, "
            f"total {fmt(self.total)}")


def _itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize


def _tree_bytes(tree, array_bytes, dtype=None) -> int:
  """Bytes per device of ``tree``'s arrays: ``array_bytes(shape, dtype,
  packed)`` for each (``packed``: part of a packed buffer)."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Packed)):
    for a in jax.tree.leaves(x):
      total += array_bytes(a.shape, dtype or a.dtype, isinstance(x, Packed))
  return total


def _state_bytes(state, array_bytes, mu_dtype=None, nu_dtype=None) -> int:
  """Bytes per device of an optimizer state (``jax.ShapeDtypeStruct`` leaves),
  each array counted by ``array_bytes``; ``mu_dtype``/``nu_dtype``, when
  given, replace the moments' dtypes."""
  def is_moments(x):
    return hasattr(x, "_fields") and "mu" in x._fields

  total = 0
  for x in jax.tree.leaves(state, is_leaf=lambda x: is_moments(x) or isinstance(x, Packed)):
    if not is_moments(x):
      total += _tree_bytes(x, array_bytes)
      continue
    for name in x._fields:
      want = {"mu": mu_dtype, "nu": nu_dtype, "nu_max": nu_dtype}.get(name)
      total += _tree_bytes(getattr(x, name), array_bytes, want)
  return total


def _whole_bytes(shape, dtype, packed=False) -> int:
  """An array that every device holds whole."""
  return math.prod(shape) * _itemsize(dtype)


def _sliced_bytes(n: int):
  """ZeRO: packed buffers split over ``n`` devices, the rest whole."""
  return lambda shape, dtype, packed: _whole_bytes(shape, dtype) // (n if packed else 1)


def _fsdp_bytes(n: int):
  """FSDP: every array split over ``n`` devices where it divides (see
  :func:`jadam._sharding.fsdp_spec`), else whole."""
  def array_bytes(shape, dtype, packed=False):
    split = any(a is not None for a in fsdp_spec(shape, n, "data"))
    return _whole_bytes(shape, dtype) // (n if split else 1)
  return array_bytes


def _zero_slices(tree, n: int, block: int, small_leaf) -> Packed:
  """ZeRO's packed slices of ``tree`` on ``n`` devices (replicated params), as
  ``jax.ShapeDtypeStruct``: what its optimizer state is made for."""
  # Imported here: jadam.parallel builds on the core.
  from .parallel._zero_layout import replicated_zero_layout  # pylint: disable=import-outside-toplevel
  layout = replicated_zero_layout(tree, n, block, small_leaf)
  return Packed(layout, {b.key: jax.ShapeDtypeStruct((b.length,), b.dtype)
                         for b in layout.flat.buffers})


def _leaves(params):
  out = []
  for path, x in V.flatten_with_none(params)[0]:
    if x is None:
      continue
    V.check_params_leaf("jadam.memory_plan", path, x)
    dtype = getattr(x, "dtype", None)
    out.append((tuple(np.shape(x)), np.dtype(dtype if dtype is not None
                                              else np.asarray(x).dtype)))
  return out


def memory_plan(
    params,
    *,
    strategy: str,
    n_devices: int,
    mu_dtype=None,
    nu_dtype=None,
    optimizer=None,
    accumulation_steps: int = 1,
    master_weights=None,
) -> MemoryPlan:
  """Bytes per device of params, gradients and optimizer state.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes and
      dtypes are read; nothing is allocated).
    strategy: ``"plain"`` (``"shard_map"``, ``"jit"`` and ``"pmap"`` are the
      same), ``"zero1"``, ``"zero2"``, ``"fsdp"`` (every array split along
      a dimension ``n_devices`` divides, else replicated), ``"onebit"``
      (plain, and the float32 error feedback: the flat momentum's worker
      buffer and ``1/N`` of it of server buffer) or ``"local"`` (plain, and
      each device's replica of the params and the default outer optimizer's
      state).
    n_devices: devices on the data axis.
    mu_dtype: dtype of the first moment (default: each param's), or a
      quantized format (``"q8"``, ``"q4"``, :class:`jadam.Quantized`): its
      codes and scales are counted exactly.
    nu_dtype: the same for the second moment.
    optimizer: optionally, the optimizer: its own state is measured with
      ``jax.eval_shape`` (nothing is allocated): for a plain strategy any
      optax optimizer's, for ZeRO a jadam optimizer's (bare or in a chain the
      ZeRO strategies accept) on the packed slices. ``mu_dtype`` and
      ``nu_dtype``, when given, replace its moments' dtypes. Default: Adam's
      count and two moments.
    accumulation_steps: micro-batches per step (``> 1``: the gradient
      accumulator is at least float32).
    master_weights: ``None``, ``"float32"`` or ``"q8"``: count the master
      weights of ``jadam.adam(..., master_weights=...)`` (without
      ``optimizer``; a given optimizer's own are counted as it keeps them).

  Returns:
    A :class:`MemoryPlan`.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    >>> plan = jadam.memory_plan(params, strategy="zero1", n_devices=8)
    >>> plan.per_param("opt_state")  # 8 bytes of moments over 8 devices
    1.0
  """
  V.check_choice("jadam.memory_plan", "strategy", strategy, STRATEGIES)
  V.check_positive_int("jadam.memory_plan", "n_devices", n_devices)
  V.check_positive_int("jadam.memory_plan", "accumulation_steps", accumulation_steps)
  mu_dtype = _quant.resolve("jadam.memory_plan", "mu_dtype", mu_dtype)
  nu_dtype = _quant.resolve("jadam.memory_plan", "nu_dtype", nu_dtype)
  _master.check_format("jadam.memory_plan", "master_weights", master_weights)
  if master_weights is not None and optimizer is not None:
    raise ValueError(
        "`jadam.memory_plan(master_weights=...)` is for the default optimizer; pass "
        "master_weights to the optimizer itself (e.g. jadam.adam(..., "
        "master_weights='q8')) and give only `optimizer`")
  if master_weights is not None or _quant.is_quantized(mu_dtype) or _quant.is_quantized(nu_dtype):
    if optimizer is not None:
      raise ValueError(
          "`jadam.memory_plan(mu_dtype=..., nu_dtype=...)` replace the dtypes of "
          "a given optimizer's moments; for quantized moments pass them to the "
          "optimizer itself (e.g. jadam.adam(..., mu_dtype='q8')) and give only "
          "`optimizer`")
    # Quantized moments: measure the state jadam.adam makes (codes and
    # scales, tiny leaves float32), exactly as the trainer's arrays hold it.
    from . import _optimizers  # pylint: disable=import-outside-toplevel
    optimizer = _optimizers.adam(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                                 master_weights=master_weights)
    mu_dtype = nu_dtype = None
  n = int(n_devices)
  leaves = _leaves(params)
  num_params = sum(math.prod(s) for s, _ in leaves)
  params_bytes = sum(math.prod(s) * dt.itemsize for s, dt in leaves)

  parts = _compose.parts(optimizer) if optimizer is not None else None
  tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), V.dtype_of(x)), params)

  def grad_dtype(dtype):
    if accumulation_steps > 1:
      return np.dtype(jnp.promote_types(dtype, jnp.float32))
    return dtype

  def adam_bytes(sizes_dtypes, share):
    # No optimizer given: Adam's count and two moments.
    rule = _rule.Rule("adam")
    return np.dtype(np.int32).itemsize + sum(
        size // share * _itemsize(m)
        for size, dt in sizes_dtypes for m in moment_dtypes(rule, dt, mu_dtype, nu_dtype))

  if strategy == "fsdp":
    # Every array split along a dimension the device count divides (else
    # replicated): params, gradients and the optimizer's own state alike.
    if optimizer is None:
      from . import _optimizers  # pylint: disable=import-outside-toplevel
      optimizer = _optimizers.adam(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
      mu_dtype = nu_dtype = None
    fsdp = _fsdp_bytes(n)
    params_fsdp = sum(fsdp(s, dt) for s, dt in leaves)
    grads = sum(fsdp(s, grad_dtype(dt)) for s, dt in leaves)
    opt_state = _state_bytes(jax.eval_shape(optimizer.init, tree), fsdp, mu_dtype, nu_dtype)
    return MemoryPlan("fsdp", n, num_params, params_fsdp, grads, opt_state)

  if strategy in PLAIN_STRATEGIES + OWN_STATE_STRATEGIES:
    grads = sum(math.prod(s) * grad_dtype(dt).itemsize for s, dt in leaves)
    if optimizer is None:
      opt_state = adam_bytes([(math.prod(s), dt) for s, dt in leaves], 1)
    else:  # the optimizer's own state, measured (nothing is allocated)
      opt_state = _state_bytes(jax.eval_shape(optimizer.init, tree), _whole_bytes,
                               mu_dtype, nu_dtype)
    opt_state += _strategy_state_bytes(strategy, tree, num_params, params_bytes, n)
    return MemoryPlan("plain" if strategy == "plain" else strategy, n,
                      num_params, params_bytes, grads, opt_state)

  if optimizer is not None and (len(parts.jadam) != 1 or parts.unknown()):
    raise ValueError(
        f"`jadam.memory_plan(strategy={strategy!r})` needs a jadam optimizer, "
        "bare or in an optax.chain with elementwise transformations or "
        "optax.clip_by_global_norm (ZeRO applies a jadam rule to flat slices), "
        f"got {optimizer!r}")
  _, block, small_leaf = _flat.optimizer_packing(optimizer)
  layout = FlatLayout.from_tree(
      tree, pad_multiple=math.lcm(sharded_pad_multiple(n), block * n), small_leaf=small_leaf)
  if optimizer is None:
    opt_state = adam_bytes([(b.length, b.dtype) for b in layout.buffers], n)
  else:
    # The optimizer's own state for ZeRO's packed slices: packed arrays are
    # split over the devices, the rest (counts, scalars) replicated.
    opt_state = _state_bytes(
        jax.eval_shape(optimizer.init, _zero_slices(tree, n, block, small_leaf)),
        _sliced_bytes(n), mu_dtype, nu_dtype)
  if strategy == "zero1":
    grads = sum(math.prod(s) * grad_dtype(dt).itemsize for s, dt in leaves)
  else:
    grads = sum(b.length // n * grad_dtype(b.dtype).itemsize for b in layout.buffers)
  return MemoryPlan(strategy, n, num_params, params_bytes, grads, opt_state)


def _strategy_state_bytes(strategy: str, tree, num_params: int, params_bytes: int,
                          n: int) -> int:
  """What a strategy keeps per device besides the optimizer's state."""
  # pylint: disable=import-outside-toplevel
  if strategy == "onebit":  # step count, worker and server error feedback
    from .parallel._sign_exchange import padded_size
    padded = padded_size(num_params, n)
    return 4 + 4 * (padded + padded // n)
  if strategy == "local":  # step count, this device's replica, the outer state
    from .parallel._local import LocalSteps
    outer = jax.eval_shape(LocalSteps().outer().init, tree)
    return 4 + params_bytes + _state_bytes(outer, _whole_bytes)
  return 0
