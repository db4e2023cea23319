"""Loss scaling for float16 training: a fixed scale, or a dynamic one that
halves on overflow and doubles after ``growth_interval`` good steps.

:func:`with_loss_scale` wraps an optimizer: its state is a
:class:`LossScaleState` (the scale, the good steps since it last changed, the
optimizer's own state). Whoever computes the gradient multiplies the loss by
``state.scale`` first (``jadam.parallel.DataParallel(loss_scale=...)`` does);
the wrapper hands ``1 / scale`` to the jadam optimizer, which unscales the
gradient in float32 inside its own update pass. A dynamic scale needs a
jadam optimizer with ``skip_nonfinite=True``: an overflowing step is skipped
by it, and the wrapper reads its ``last_finite`` to halve the scale.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _compose
from ._transformation import GRAD_SCALE_ARG

DYNAMIC_INITIAL_SCALE = 2.0**15
MIN_SCALE, MAX_SCALE = 2.0**-24, 2.0**24  # the bounds of a dynamic scale


class LossScaleState(NamedTuple):
  """The state of a loss-scaled optimizer.

  Attributes:
    scale: float32, the factor the loss is multiplied by.
    good_steps: int32, finite steps since the scale last changed.
    inner_state: the optimizer's own state.
  """

  scale: jax.Array
  good_steps: jax.Array
  inner_state: Any


def check_loss_scale(fn: str, loss_scale, growth_interval) -> None:
  """Raises a ValueError naming the argument unless ``loss_scale`` is None,
  ``"dynamic"`` or a positive finite number and ``growth_interval`` a
  positive integer."""
  if loss_scale is not None and loss_scale != "dynamic":
    if (isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
        or not math.isfinite(loss_scale) or loss_scale <= 0):
      raise ValueError(f"`{fn}(loss_scale=...)` must be None, 'dynamic' or a positive "
                       f"number, got {loss_scale!r}")
  if (isinstance(growth_interval, bool) or not isinstance(growth_interval, int)
      or growth_interval < 1):
    raise ValueError(f"`{fn}(loss_scale_growth_interval=...)` must be a positive "
                     f"integer, got {growth_interval!r}")


def with_loss_scale(inner, loss_scale, *, growth_interval: int = 2000,
                    fn: str = "DataParallel") -> optax.GradientTransformationExtraArgs:
  """``inner`` with loss scaling (see the module docstring).

  Args:
    inner: the optimizer: a jadam optimizer (bare: the gradient is unscaled
      inside its pass) or any optax transformation (the gradient is unscaled
      first, in float32).
    loss_scale: a positive number (fixed) or ``"dynamic"`` (from 2**15, kept
      within [2**-24, 2**24]).
    growth_interval: good steps after which a dynamic scale doubles.
    fn: the caller's name, for error messages.
  """
  check_loss_scale(fn, loss_scale, growth_interval)
  dynamic = loss_scale == "dynamic"
  parts = _compose.parts(inner)
  fused = len(parts.jadam) == 1 and not parts.others  # a bare jadam optimizer
  if dynamic and not (len(parts.jadam) == 1 and parts.jadam[0].rule.skip_nonfinite):
    raise ValueError(
        f"`{fn}(loss_scale='dynamic')` needs a jadam optimizer with skip_nonfinite=True "
        "(an overflowing step is skipped by it, and the scale halved), got "
        f"{inner!r}")
  initial = DYNAMIC_INITIAL_SCALE if dynamic else float(loss_scale)
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return LossScaleState(jnp.asarray(initial, jnp.float32), jnp.zeros([], jnp.int32),
                          inner.init(params))

  def update(updates, state, params=None, **extra_args):
    inverse = 1.0 / state.scale
    if fused:
      extra_args = {**extra_args, GRAD_SCALE_ARG: inverse}
    else:
      updates = jax.tree.map(lambda g: g.astype(jnp.float32) * inverse, updates)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    if not dynamic:
      return updates, state._replace(inner_state=inner_state)
    finite = optax.tree.get(inner_state, "last_finite")
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= growth_interval
    scale = jnp.where(finite, jnp.where(grow, 2 * state.scale, state.scale), state.scale / 2)
    # Within [MIN_SCALE, MAX_SCALE]: never 0 (1 / 0) nor inf.
    scale = jnp.clip(scale, MIN_SCALE, MAX_SCALE)
    return updates, LossScaleState(scale, jnp.where(grow, 0, good).astype(jnp.int32),
                                   inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def scale_of(opt_state):
  """The loss scale in ``opt_state`` (the first :class:`LossScaleState` in
  it), or ``None``."""
  is_node = lambda x: isinstance(x, LossScaleState)
  for node in jax.tree.leaves(opt_state, is_leaf=is_node):
    if is_node(node):
      return node.scale
  return None


# Seen through by jadam._compose (ZeRO, OneBit and the memory plan find the
# jadam optimizer inside).
_compose.register_wrapper(with_loss_scale(optax.identity(), 1.0), "inner")
