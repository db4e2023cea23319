"""The pure functional core: Adam state as a pytree, ``init``/``update``/``step``.

This module holds the *tree layout* (one moment leaf per param leaf, optax's
layout) and the functional API built on it. A packed flat value (see
:class:`jadam.FlatLayout`) is itself a pytree of buffers, so the same
functions run one fused pass per buffer on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _kernel
from . import _master
from . import _quant
from . import _rule
from . import _segments
from . import _update
from . import _validate as V
# The state's containers and zero state live in ._state; re-exported here.
from ._state import AdamState as AdamState
from ._state import AmsgradState as AmsgradState
from ._state import check_state as check_state
from ._state import init_state as init_state
from ._state import moment_dtypes as moment_dtypes
from ._state import moment_formats as moment_formats
from ._state import state_class as state_class


class OptimizerSpec(NamedTuple):
  """Everything that defines one optimizer, independent of the state layout.

  Layouts (tree, flat, ZeRO-sharded) build their transformation from a spec;
  the math lives in :mod:`jadam._rule`.
  """

  name: str
  rule: _rule.Rule
  learning_rate: Any  # float | array | schedule | None (no scaling)
  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  weight_decay: Any  # float | array | schedule
  mask: Any  # None | tree of bools | callable(params) -> tree
  threshold: Any = 5.0
  mu_dtype: Any = None
  nu_dtype: Any = None

  def hyper(self) -> _rule.Hyper:
    """Hyperparameter values as the update path takes them.

    Schedules stay callables: the update path evaluates them at the step count
    inside its one jitted computation (:func:`jadam._update.step_inputs`), so
    an eager step and a jitted one compute the same schedule value.
    """
    return _rule.Hyper(
        learning_rate=_as_hyper(self.learning_rate), b1=_as_hyper(self.b1),
        b2=_as_hyper(self.b2), eps=_as_hyper(self.eps), eps_root=_as_hyper(self.eps_root),
        weight_decay=_as_hyper(self.weight_decay), threshold=_as_hyper(self.threshold),
    )

  def uses_weight_decay(self) -> bool:
    wd = self.weight_decay
    return callable(wd) or isinstance(wd, jax.core.Tracer) or np.asarray(wd) != 0

  def validate(self) -> None:
    """Construction-time checks of every hyperparameter (concrete values only)."""
    fn = self.name
    if self.learning_rate is not None:
      V.check_range(fn, "learning_rate", self.learning_rate, low=0.0, allow_schedule=True)
    V.check_range(fn, "b1", self.b1, low=0.0, high=1.0)
    V.check_range(fn, "b2", self.b2, low=0.0, high=1.0)
    V.check_range(fn, "eps", self.eps, low=0.0)
    V.check_range(fn, "eps_root", self.eps_root, low=0.0)
    V.check_range(fn, "weight_decay", self.weight_decay, low=0.0, allow_schedule=True)
    V.check_real(fn, "threshold", self.threshold)
    V.check_mask_arg(fn, self.mask)


def _as_hyper(x):
  """Python/NumPy scalars stay Python floats (weakly typed, as optax uses them);
  arrays become float32 (hyperparameter math is float32 whatever the params)."""
  if x is None or callable(x):
    return x
  if isinstance(x, (bool, np.bool_)):
    raise ValueError(f"hyperparameters must be numbers, got {x!r}")
  if isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0):
    return float(x)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 4:
    x = x.astype(jnp.float32)  # exact for bfloat16 and float16 values
  return x


def tree_update(
    fn: str,
    rule: _rule.Rule,
    hp: _rule.Hyper,
    grads,
    state,
    params=None,
    *,
    decay_mask: list[bool] | None = None,
    apply: bool = False,
    scale_lr: bool = True,
):
  """One step in the tree layout.

  Args:
    fn: the public function's name, for error messages.
    rule: the static rule.
    hp: hyperparameter values at this step.
    grads: gradients, a tree shaped like ``state.mu``.
    state: ``AdamState`` or ``AmsgradState``.
    params: current params (needed for weight decay, LAMB and ``apply``).
    decay_mask: per-leaf booleans (in flattening order, ``None`` leaves
      included): where weight decay applies. ``None``: everywhere.
    apply: return new params instead of updates (fused ``p + u``).
    scale_lr: multiply by ``-learning_rate`` (False for ``scale_by_adam``).

  Returns:
    ``(updates, new_state, finite)``, or ``(new_params, new_state, finite)``
    with ``apply``; ``finite`` (with ``rule.skip_nonfinite``) says whether the
    step was taken, else it is ``None``.
  """
  check_state(fn, rule, state)
  rule = _kernel.effective_rule(rule)  # JADAM_KERNEL, part of the jit's key
  V.check_same_structure("grads", grads, "state.mu", _quant.as_arrays(state.mu))
  use_wd = _update.check_params_given(fn, rule, hp, params, apply=apply)
  if params is not None:
    V.check_same_structure("params", params, "grads", grads)
  if decay_mask is None:
    decay_mask = (True,) * len(V.flatten_with_none(grads)[0])
  static = (rule, tuple(decay_mask), use_wd, "fused" if apply else None, scale_lr)
  return _update.jitted(_tree_body, static, hp, grads, state, params)


def _tree_body(static, hp, grads, state, params):
  # The tree layout's chunks: one per leaf, each one whole parameter.
  rule, decay_mask, use_wd, apply, scale_lr = static
  g_flat, treedef = V.flatten_with_none(grads)
  g_flat = [g for _, g in g_flat]
  moments_flat = [treedef.flatten_up_to(getattr(state, n)) for n in rule.moment_names]
  p_flat = treedef.flatten_up_to(params) if params is not None else [None] * len(g_flat)
  live = [i for i, g in enumerate(g_flat) if g is not None]
  chunks = [_update.Chunk(g_flat[i], tuple(m[i] for m in moments_flat), p_flat[i],
                          _segments.WHOLE, (decay_mask[i],)) for i in live]
  out_dtypes = [_update.update_dtype(rule, (g_flat[i] if p_flat[i] is None else p_flat[i]).dtype)
                for i in live]
  count_inc, results, finite = _kernel.update_and_finish(
      rule, hp, state.count, chunks, use_wd=use_wd, scale_lr=scale_lr, apply=apply,
      out_dtypes=out_dtypes)
  out = [None] * len(g_flat)
  new_moments = [[None] * len(g_flat) for _ in rule.moment_names]
  for i, (o, moms) in zip(live, results):
    out[i] = o
    for nm, m in zip(new_moments, moms):
      nm[i] = m
  new_state = state_class(rule)(count_inc, *(treedef.unflatten(m) for m in new_moments))
  return treedef.unflatten(out), new_state, finite


# ---------------------------------------------------------------- public API


def init(params, *, mu_dtype=None, nu_dtype=None, master_weights=None) -> AdamState:
  """Creates Adam's state for ``params``: zero moments, count 0.

  Args:
    params: a pytree of float (or complex) arrays, ``jax.ShapeDtypeStruct``
      leaves (zeros are made with their shape, dtype and sharding), or a
      packed flat value. ``None`` leaves pass through.
    mu_dtype: dtype of the first moment (default: each param's dtype).
    nu_dtype: dtype of the second moment (default: each param's dtype).
    master_weights: ``None``, ``"float32"`` or ``"q8"``: master weights for
      bfloat16/float16 params, as in :func:`jadam.adam` (then the state has a
      ``master`` field, zero, and :func:`jadam.update` and :func:`jadam.step`
      keep the master values in it).

  Returns:
    A :class:`jadam.AdamState` ``(count, mu, nu)`` (with master weights
    ``(count, mu, nu, master)``); it never aliases ``params``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones((2, 3))}
    >>> state = jadam.init(params)
    >>> state.mu["w"].shape
    (2, 3)
  """
  mu_dtype = _quant.resolve("jadam.init", "mu_dtype", mu_dtype)
  nu_dtype = _quant.resolve("jadam.init", "nu_dtype", nu_dtype)
  _master.check_format("jadam.init", "master_weights", master_weights)
  return init_state("jadam.init", _rule.Rule("adam", master=master_weights), params, mu_dtype,
                    nu_dtype)


def _functional_hyper(fn, learning_rate, b1, b2, eps, eps_root, weight_decay):
  spec = OptimizerSpec(
      name=fn, rule=_rule.Rule("adam"), learning_rate=learning_rate, b1=b1, b2=b2,
      eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=None,
  )
  for name, v in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
    if callable(v):
      raise ValueError(
          f"`{fn}({name}=...)` must be a number or an array; for a schedule, "
          f"evaluate it at state.count (or use jadam.adam)"
      )
  spec.validate()
  return spec.hyper()


def _functional_rule(fn: str, nesterov, skip_nonfinite, kernel, state) -> _rule.Rule:
  V.check_choice(fn, "kernel", kernel, _rule.KERNELS)
  return _rule.Rule("adam", nesterov=bool(nesterov),
                    skip_nonfinite=V.check_bool(fn, "skip_nonfinite", skip_nonfinite),
                    master=_master_format(state), kernel=kernel)


def _master_format(state) -> str | None:
  """The master weights' format of a state from :func:`init`: none, or that
  of its ``master`` field's arrays (float32 or int8)."""
  master = getattr(state, "master", None) if isinstance(state, tuple) else None
  dtypes = {np.dtype(V.dtype_of(x)) for x in jax.tree.leaves(master)}
  if not dtypes:
    return None
  for fmt in _master.FORMATS:
    if dtypes == {_master.state_dtype(fmt)}:
      return fmt
  raise ValueError(f"`state.master` must hold float32 (master_weights='float32') or int8 "
                   f"('q8') arrays, got {sorted(d.name for d in dtypes)}")


def update(
    grads,
    state: AdamState,
    params=None,
    *,
    learning_rate=1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=0.0,
    nesterov: bool = False,
    skip_nonfinite: bool = False,
    kernel: str = "auto",
):
  r"""One Adam(W) step: returns the updates (to add to the params) and the new state.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
    u_t = -\alpha\left(\frac{m_t / (1-\beta_1^t)}
          {\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}
          + \lambda p_{t-1}\right)

  Hyperparameters may be Python floats or JAX arrays (a new array under
  ``jit`` does not retrace). All hyperparameter and bias-correction math is
  float32 whatever the params' dtype; updates come back in each param's dtype.

  Args:
    grads: gradients, shaped like the params.
    state: the state from :func:`jadam.init` or a previous update. A state
      made with ``master_weights`` keeps the params' master values (its
      format is read from the state): the updates are the params' change,
      float32 for low-precision params (see :func:`jadam.adam`).
    params: current params; required when ``weight_decay`` is not 0 or the
      state has master weights.
    learning_rate: step size :math:`\alpha` (>= 0).
    b1: first-moment decay :math:`\beta_1`, in [0, 1).
    b2: second-moment decay :math:`\beta_2`, in [0, 1).
    eps: added to the denominator outside the square root (>= 0).
    eps_root: added inside the square root (>= 0).
    weight_decay: decoupled weight decay :math:`\lambda` (AdamW).
    nesterov: use Nesterov momentum (NAdam).
    skip_nonfinite: if the gradient holds a NaN or an inf, skip the step:
      zero updates and the state as it was (``new_state.count ==
      state.count`` tells a skipped step).
    kernel: ``"auto"``, ``"xla"`` or ``"fused"`` (the fused CPU kernel), as
      in :func:`jadam.adam`.

  Returns:
    ``(updates, new_state)``.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones(3)}
    >>> state = jadam.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = jadam.update(grads, state, params, learning_rate=0.1)

  References:
    Kingma & Ba, 2014, https://arxiv.org/abs/1412.6980;
    Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101.

  .. seealso:: :func:`jadam.step`, :func:`jadam.adam`.
  """
  hp = _functional_hyper("jadam.update", learning_rate, b1, b2, eps, eps_root, weight_decay)
  rule = _functional_rule("jadam.update", nesterov, skip_nonfinite, kernel, state)
  return tree_update("jadam.update", rule, hp, grads, state, params)[:2]


def step(
    grads,
    state: AdamState,
    params,
    *,
    learning_rate=1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=0.0,
    nesterov: bool = False,
    skip_nonfinite: bool = False,
    kernel: str = "auto",
):
  """One Adam(W) step, update and apply in one pass: ``(new_params, new_state)``.

  Same arguments as :func:`jadam.update`; ``params`` is required. The new
  params are rounded once to their dtype (``p + u`` is computed in float32);
  with ``skip_nonfinite`` a step on a gradient with a NaN or inf returns the
  params and state as they were. On CPU ``kernel="auto"`` runs it as the
  fused kernel (params and moments in place, one pass): optax's result to
  float32 rounding, not its bits (``kernel="xla"`` gives those); see
  :mod:`jadam._kernel`.

  To donate, jit a train step whose donated arguments come in the order of
  the outputs, ``(params, state)`` (as below and in the README); donating
  ``jadam.step``'s own ``(state, params)`` pairs buffers with outputs of the
  same shape in the other order, and XLA adds copies.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones(3)}
    >>> state = jadam.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> params, state = jax.jit(jadam.step)(grads, state, params)
  """
  hp = _functional_hyper("jadam.step", learning_rate, b1, b2, eps, eps_root, weight_decay)
  rule = _functional_rule("jadam.step", nesterov, skip_nonfinite, kernel, state)
  return tree_update("jadam.step", rule, hp, grads, state, params, apply=True)[:2]
