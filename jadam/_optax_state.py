"""optax's own state trees for jadam's optimizers: the drop-in contract.

``jadam.adamw(...).init(params)`` returns exactly the pytree that
``optax.adamw(...).init(params)`` returns — optax's NamedTuple classes
(``ScaleByAdamState``, ``ScaleByAmsgradState``, ``EmptyState``,
``MaskedState``, ``ScaleByScheduleState``, ``WeightDecaySchedule``), nesting,
shapes and dtypes — so optax checkpoints restore into jadam and back,
``opt_state[0].mu`` works, and ``optax.tree_utils`` finds what it looks for.

The structure is optax's own: ``jax.eval_shape`` of the optax optimizer of the
same name and arguments (nothing runs, nothing is allocated). jadam fills it:
its moments (with ``nu_dtype``, packed for packed params) in the moments node,
zeros in optax's step counters. An update takes the moments node out as
jadam's ``AdamState``, runs the one update path on it, puts the new moments
back, and advances optax's other counters as optax's own update does.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _core
from . import _quant
from . import _rule

_MOMENT_NODES = (optax.ScaleByAdamState, optax.ScaleByAmsgradState)


class MasterState(NamedTuple):
  """Master weights (``master_weights=``) around optax's state tree.

  Attributes:
    master: per param, what the param lacks of its float32 master value
      (see :mod:`jadam._master`): float32 or int8, shaped like the params
      (or packed like the moments).
    inner_state: optax's own state tree of the optimizer.
  """

  master: Any
  inner_state: Any


def reference(spec: _core.OptimizerSpec) -> optax.GradientTransformation:
  """The optax optimizer of ``spec``'s name, with the same arguments."""
  fn = getattr(optax, spec.name)
  values = dict(
      learning_rate=spec.learning_rate, b1=spec.b1, b2=spec.b2, eps=spec.eps,
      eps_root=spec.eps_root,
      mu_dtype=None if isinstance(spec.mu_dtype, (str, _quant.Quantized)) else spec.mu_dtype, weight_decay=spec.weight_decay,
      mask=spec.mask, nesterov=spec.rule.nesterov, threshold=spec.threshold,
      bias_correction_mu=spec.rule.bias_correction_mu,
      bias_correction_nu=spec.rule.bias_correction_nu,
  )
  names = inspect.signature(fn).parameters
  return fn(**{k: v for k, v in values.items() if k in names})


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def init(spec: _core.OptimizerSpec, tree_params, inner) -> object:
  """optax's state tree for ``tree_params`` around jadam's ``inner`` state.

  Args:
    spec: the optimizer.
    tree_params: the params' tree (arrays or ``ShapeDtypeStruct``; only
      structure, shapes and dtypes are read).
    inner: jadam's ``AdamState``/``AmsgradState`` (moments in any layout).
  """
  template = jax.eval_shape(reference(spec).init, _abstract(tree_params))

  def fill(node):
    if isinstance(node, _MOMENT_NODES):
      return type(node)(inner.count, *(getattr(inner, n) for n in spec.rule.optax_names))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), node)

  state = jax.tree.map(fill, template, is_leaf=lambda x: isinstance(x, _MOMENT_NODES))
  if spec.rule.master:
    state = MasterState(master=inner.master, inner_state=state)
  if not spec.rule.skip_nonfinite:
    return state
  # optax.apply_if_finite(optax.X(...), max_consecutive_errors)'s own state.
  # (Separate arrays: a donated state must not hold one buffer twice.)
  return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
      total_notfinite=jnp.zeros([], jnp.int32), inner_state=state)


def _moments_index(fn: str, state) -> int | None:
  if isinstance(state, _MOMENT_NODES):
    return None
  if isinstance(state, tuple) and not hasattr(state, "_fields") and state and isinstance(
      state[0], _MOMENT_NODES):
    return 0
  raise ValueError(
      f"`{fn}(state=...)` must be this optimizer's state, optax's own tree (as "
      f"`optax.{fn}(...).init(params)` makes it: a ScaleByAdamState or "
      f"ScaleByAmsgradState first), got {type(state).__name__}")


def split(fn: str, rule: _rule.Rule, state):
  """``(inner, rebuild)``: jadam's state taken out of optax's tree, and a
  function ``rebuild(new_inner, finite)`` that puts a new one back (advancing
  optax's other counters; with ``rule.skip_nonfinite``, only if ``finite``,
  and counting the skipped steps as ``optax.apply_if_finite`` does)."""
  if not rule.skip_nonfinite:
    return _split(fn, rule, state)
  if not isinstance(state, optax.ApplyIfFiniteState):
    raise ValueError(
        f"`{fn}(..., skip_nonfinite=True)` keeps optax.apply_if_finite's state "
        f"(optax.ApplyIfFiniteState, from its own init), got {type(state).__name__}")
  inner, rebuild_inner = _split(fn, rule, state.inner_state)

  def rebuild(new_inner, finite):
    bump = _rule.safe_increment
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(finite, jnp.zeros_like(state.notfinite_count),
                                  bump(state.notfinite_count)),
        last_finite=finite,
        total_notfinite=jnp.where(finite, state.total_notfinite, bump(state.total_notfinite)),
        inner_state=rebuild_inner(new_inner, finite))

  return inner, rebuild


def _split(fn: str, rule: _rule.Rule, state):
  if not rule.master:
    return _split_optax(fn, rule, state, ())
  if not isinstance(state, MasterState):
    raise ValueError(
        f"`{fn}(..., master_weights={rule.master!r})` keeps a jadam.MasterState "
        f"around optax's state (from its own init), got {type(state).__name__}")
  inner, rebuild_inner = _split_optax(fn, rule, state.inner_state, (state.master,))

  def rebuild(new_inner, finite=None):
    return MasterState(new_inner.master, rebuild_inner(new_inner, finite))

  return inner, rebuild


def _split_optax(fn: str, rule: _rule.Rule, state, extra: tuple):
  index = _moments_index(fn, state)
  node = state if index is None else state[index]
  want = optax.ScaleByAmsgradState if rule.kind == "amsgrad" else optax.ScaleByAdamState
  if type(node) is not want:
    raise ValueError(
        f"`{fn}(state=...)` must hold a {want.__name__} (from the matching init), "
        f"got {type(node).__name__}")
  inner = _core.state_class(rule)(node.count, *(getattr(node, n) for n in rule.optax_names),
                                  *extra)

  def rebuild(new_inner, finite=None):
    new_node = type(node)(new_inner.count, *(getattr(new_inner, n) for n in rule.optax_names))
    if index is None:
      return new_node
    # optax's other parts are step counters (schedules, masked weight decay):
    # each update advances them, as optax's own updates do (a skipped one not).
    step = _rule.safe_increment
    if finite is not None:
      step = lambda c: jnp.where(finite, _rule.safe_increment(c), c)  # noqa: E731
    return (new_node,) + tuple(jax.tree.map(step, state[1:]))

  return inner, rebuild


def reset_master(state):
  """``state`` with the master weights of every :class:`MasterState` in it
  zeroed: the master values become the params (after params are set anew)."""
  def reset(node):
    if isinstance(node, MasterState):
      return node._replace(master=jax.tree.map(jnp.zeros_like, node.master))
    return node

  return jax.tree.map(reset, state, is_leaf=lambda x: isinstance(x, MasterState))
