"""The one update path: the Adam rule applied to the chunks of any layout.

Every layout — the tree (a chunk per leaf), the flat layout (a chunk per
packed buffer) and ZeRO (a chunk per device slice of a buffer) — turns its
state into :class:`Chunk` s and calls :func:`jadam._kernel.update_and_finish`,
which runs :func:`apply_chunks` as XLA ops or as the fused kernel. Around the element
rule of :mod:`jadam._rule` it applies, in optax's order, the three small
steps every layout shares: decoupled weight decay (masked per segment), LAMB's
trust ratio (per-segment norms from the layout's segments object, see
:mod:`jadam._segments`) and the learning rate. :func:`finish` casts the result
once, as updates or applied to the params.

:func:`jitted` is the one jit boundary of the tree and flat layouts: Python-float
hyperparameters stay compile-time constants (optax folds ``1 - b1`` in double
precision, and so must we for bit parity), the learning rate and weight decay
are always traced float32 (a new value never recompiles), and an eager call
runs the same fused program as a jitted one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _master
from . import _quant
from . import _rule
from ._sharding import like_sharding


class Chunk(NamedTuple):
  """One piece of the state that the rule updates in one fused pass.

  Attributes:
    grad: the gradient (any shape).
    moments: the state arrays named by ``rule.moment_names``, shaped like ``grad``.
    param: the params (needed for weight decay and LAMB), or ``None``.
    segments: which parameter each element belongs to (see
      :mod:`jadam._segments`).
    decay: static per-segment booleans: where weight decay applies.
  """

  grad: jax.Array
  moments: tuple[jax.Array, ...]
  param: jax.Array | None
  segments: Any
  decay: tuple[bool, ...]


def _decay(direction, param, weight_decay, where):
  if where is False:
    return direction
  decayed = direction + weight_decay * param
  if where is True:
    return decayed
  return jnp.where(like_sharding(where, direction), decayed, direction)


def apply_rule(rule: _rule.Rule, hp: _rule.Hyper, scalars: _rule.StepScalars, chunk: Chunk,
               *, use_wd: bool, scale_lr: bool):
  """The update of one chunk (in the compute dtype) and its new moments."""
  # Quantized moments (see :mod:`jadam._quant`) are decoded to float32 here
  # and encoded again below: the rule only ever sees float values.
  stored = chunk.moments
  master = stored[-1] if rule.master else None
  stored = stored[:len(rule.optax_names)]
  direction, moments = _rule.element_update(rule, hp, scalars, chunk.grad,
                                            tuple(_quant.decode(m) for m in stored))
  moments = tuple(_quant.encode_like(m, old) for m, old in zip(moments, stored))
  p = None if chunk.param is None else chunk.param.astype(direction.dtype)
  if master is not None:  # the float32 value the param stands for
    p = _master.decode(master, chunk.param).astype(direction.dtype)
  if use_wd:
    direction = _decay(direction, p, hp.weight_decay, chunk.segments.select(chunk.decay))
  if rule.trust_ratio:
    p_norm, u_norm = chunk.segments.norms((p, direction))
    ratio = chunk.segments.expand(_rule.trust_ratio(p_norm, u_norm))
    direction = direction * like_sharding(ratio, direction)
  if scale_lr:
    direction = jnp.asarray(-hp.learning_rate, dtype=direction.dtype) * direction
  if master is not None:
    # The update goes to the master value; the param becomes its rounding,
    # and the update returned is the param's change (see jadam._master.step).
    update, new_master = _master.step(rule.master, p + direction, chunk.param)
    direction = update.astype(direction.dtype)
    moments = moments + (new_master,)
  return direction, moments


def all_finite(grads) -> jax.Array:
  """Whether every element of ``grads`` (arrays) is finite: a bool scalar.

  ``sum(g * 0)`` is 0 exactly when every element is finite (``0 * inf`` and
  ``0 * nan`` are NaN, and a sum of zeros cannot overflow): a plain sum, which
  XLA vectorizes, 4x faster on CPU than a reduction of ``isfinite`` flags.
  """
  sums = [jnp.sum(g * jnp.zeros([], g.dtype), dtype=jnp.result_type(g, jnp.float32))
          for g in grads]
  return jnp.isfinite(sum(sums)) if sums else jnp.array(True)


def step_inputs(rule: _rule.Rule, hp: _rule.Hyper, count: jax.Array):
  """``(hp, count + 1, scalars)``: ``hp`` with its schedules evaluated at
  ``count``, the new count and :func:`jadam._rule.step_scalars` of the step."""
  hp = evaluate_schedules(hp, count)
  count_inc = _rule.safe_increment(count)
  return hp, count_inc, _rule.step_scalars(rule, hp, count_inc)


def next_count(count, count_inc, finite):
  """The state's new count: ``count`` again after a skipped step."""
  return count_inc if finite is None else jnp.where(finite, count_inc, count)


def apply_chunks(rule: _rule.Rule, hp: _rule.Hyper, scalars: _rule.StepScalars, chunks, *,
                 use_wd: bool, scale_lr: bool, finite=None):
  """One step of ``rule`` over ``chunks``, once ``hp`` and ``scalars`` are
  known (:func:`step_inputs`).

  Args:
    rule: the static rule.
    hp: hyperparameter values at this step, schedules evaluated.
    scalars: the step's :class:`jadam._rule.StepScalars`.
    chunks: :class:`Chunk` s.
    use_wd: whether weight decay applies at all (static).
    scale_lr: multiply by ``-learning_rate`` (False for ``scale_by_adam``).
    finite: with ``rule.skip_nonfinite``, whether the whole gradient is
      finite (a bool scalar; a caller that holds only a slice of it reduces
      the flag over the devices first); ``None``: read from the chunks.

  Returns:
    ``([(update, new_moments) per chunk], finite)``; updates are in the
    compute dtype (see :func:`finish`), moments in their stored dtypes. With
    ``rule.skip_nonfinite`` the update runs under a conditional on
    ``finite``; on a gradient that is not finite: zero updates and the
    moments as they were (:func:`next_count` keeps the count). ``finite`` is
    ``None`` without ``skip_nonfinite``.
  """

  def step():
    return [apply_rule(rule, hp, scalars, c, use_wd=use_wd, scale_lr=scale_lr)
            for c in chunks]

  if not rule.skip_nonfinite:
    return step(), None
  if finite is None:
    finite = all_finite([c.grad for c in chunks])

  def skip():
    # Zero updates in the compute dtype, the moments as they are.
    shapes = jax.eval_shape(step)
    return [(jnp.zeros(u.shape, u.dtype), c.moments) for (u, _), c in zip(shapes, chunks)]

  # A conditional, not a select: the update pass runs only on a finite
  # gradient. On CPU a select of new against old values measured slower
  # still; the conditional adds 28-35% at 5.2M params and about 155% at
  # 16.8M (XLA:CPU runs a branch without its parallel loops: BENCHMARKS.md).
  return jax.lax.cond(finite, step, skip), finite


def finish(u: jax.Array, param, dtype, apply: str | None) -> jax.Array:
  """The result of a chunk, rounded once.

  Args:
    u: the update in the compute dtype.
    param: the params (for ``apply``).
    dtype: the updates' dtype (without ``apply``).
    apply: ``None`` (updates), ``"fused"`` (``p + u`` computed in the compute
      dtype, rounded once: :func:`jadam.step`) or ``"rounded"`` (``u`` as it
      is added to ``p`` by ``optax.apply_updates``).
  """
  if apply == "fused":
    return (param.astype(u.dtype) + u).astype(param.dtype)
  if apply == "rounded":  # what optax.apply_updates computes
    return (param + u).astype(param.dtype)
  return u.astype(dtype)


def update_dtype(rule: _rule.Rule, dtype) -> np.dtype:
  """The dtype of the updates for params of ``dtype``: theirs, or float32
  with master weights (a low-precision update could not always carry the
  param's change exactly: see :func:`jadam._master.step`)."""
  dtype = np.dtype(dtype)
  if rule.master and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return np.dtype(np.float32)
  return dtype


def evaluate_schedules(hp: _rule.Hyper, count: jax.Array) -> _rule.Hyper:
  """``hp`` with every schedule (a callable) evaluated at the old ``count``,
  as optax does; a non-float value becomes float32."""
  def value(v):
    if isinstance(v, _Static):
      v = v.fn
    if not callable(v):
      return v
    v = jnp.asarray(v(count))
    return v if jnp.issubdtype(v.dtype, jnp.floating) else v.astype(jnp.float32)

  return hp._replace(**{k: value(v) for k, v in hp._asdict().items()})


def uses_weight_decay(hp: _rule.Hyper) -> bool:
  """False only for a weight decay that is the Python float 0."""
  return not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0)


def check_params_given(fn: str, rule: _rule.Rule, hp: _rule.Hyper, params, *,
                       apply: bool = False) -> bool:
  """Raises unless ``params`` are given where the step reads them (weight
  decay, LAMB's trust ratio, master weights, applying the update); returns
  whether weight decay applies."""
  use_wd = uses_weight_decay(hp)
  if params is None and (apply or rule.trust_ratio or use_wd or rule.master):
    raise ValueError(
        f"`{fn}` needs `params` (for weight decay, LAMB's trust ratio, master "
        f"weights or applying the update); got params=None")
  return use_wd


# ------------------------------------------------------------ the jit boundary

_DYNAMIC = "dynamic"
_ALWAYS_TRACED = ("learning_rate", "weight_decay")


def array_hyper(hp: _rule.Hyper) -> tuple[_rule.Hyper, dict]:
  """``hp`` split for ``custom_vmap``/``custom_jvp`` (the kernel's fallbacks):
  the hyperparameters with ``None`` in place of each array, and the arrays by
  name, the step's operands (Python numbers and ``None`` stay static)."""
  arrays = {k: v for k, v in hp._asdict().items()
            if v is not None and not isinstance(v, (int, float))}
  return hp._replace(**dict.fromkeys(arrays)), arrays


def split_hyper(hp: _rule.Hyper) -> tuple[_rule.Hyper, _rule.Hyper]:
  """Splits hyperparameters into static constants and traced values.

  Python-float betas, eps and threshold stay static; the learning rate and
  weight decay (which only ever multiply) are always traced float32.
  """
  static, dynamic = {}, {}
  for k, v in hp._asdict().items():
    if callable(v) or isinstance(v, _Static):  # a schedule: static, evaluated in the jit
      static[k], dynamic[k] = v if isinstance(v, _Static) else _Static(v), None
      continue
    if v is not None and k in _ALWAYS_TRACED:
      v = jnp.asarray(v, jnp.float32) if isinstance(v, float) else v
    if isinstance(v, float) or v is None:
      static[k], dynamic[k] = v, None
    else:
      static[k], dynamic[k] = _DYNAMIC, v
  return hp._replace(**static), hp._replace(**dynamic)


class _Static:
  """A schedule as a static jit argument: equal only to itself (schedules may
  be unhashable objects; a new schedule object compiles anew)."""

  __slots__ = ("fn",)

  def __init__(self, fn):
    self.fn = fn

  def __hash__(self) -> int:
    return id(self.fn)

  def __eq__(self, other) -> bool:
    return isinstance(other, _Static) and other.fn is self.fn


def merge_hyper(static_hp: _rule.Hyper, dynamic_hp: _rule.Hyper) -> _rule.Hyper:
  """Inverse of :func:`split_hyper`."""
  return static_hp._replace(**{k: v for k, v in dynamic_hp._asdict().items()
                               if getattr(static_hp, k) == _DYNAMIC})


def traced_hyper(hp: _rule.Hyper) -> _rule.Hyper:
  """``hp`` as the jitted update path sees it (for code already under ``jit``)."""
  return merge_hyper(*split_hyper(hp))


def jitted(body: Callable[..., Any], static, hp: _rule.Hyper, *args):
  """``body(static, hp, *args)`` as one cached jitted computation.

  ``body`` is a module-level function and ``static`` a hashable value: both
  are compile-time constants, like the static hyperparameters.
  """
  static_hp, dynamic_hp = split_hyper(hp)
  return _jitted(body, static, static_hp, dynamic_hp, *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), inline=True)
def _jitted(body, static, static_hp, dynamic_hp, *args):
  return body(static, merge_hyper(static_hp, dynamic_hp), *args)
