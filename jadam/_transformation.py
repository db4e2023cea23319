"""From an :class:`OptimizerSpec` to an ``optax.GradientTransformation``.

One transformation serves every layout its inputs come in: tree params (tree
or ``layout="flat"`` state), :class:`jadam.Packed` params (state packed like
them: ``DataParallel(layout="flat")``), and ZeRO's slices (updated by the
strategy's object passed as the extra argument :data:`SLICES_ARG`). Extra
arguments also carry a strategy's momentum exchange (:data:`EXCHANGE_ARG`) and
loss scaling's ``1 / scale`` (:data:`GRAD_SCALE_ARG`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from . import _compose
from . import _core
from . import _flat
from . import _master
from . import _optax_state
from . import _quant
from . import _rule
from . import _validate as V
from ._packed import Packed

LAYOUTS = ("tree", "flat")


SLICES_ARG = "jadam_slices"
"""The extra argument (``update(..., jadam_slices=...)``, passed through
``optax.chain`` and other wrappers) by which a strategy that keeps the state
in slices (ZeRO) hands a jadam optimizer the object that updates them: its
``update(spec, hp, decay_mask, updates, state, params)`` runs the rule on every
device's slice."""

EXCHANGE_ARG = "jadam_momentum_exchange"
"""The extra argument by which a strategy that exchanges the first moment
instead of the gradient (1-bit Adam's compression phase) takes part in a
jadam optimizer's update: its ``exchange(spec, state, updates)`` returns the
gradient whose moment update gives the exchanged moment, and the rule to run
(with ``nu`` frozen)."""


GRAD_SCALE_ARG = "jadam_grad_scale"
"""The extra argument by which loss scaling (:mod:`jadam._loss_scale`) hands a
jadam optimizer ``1 / loss scale``: the gradient is unscaled in float32
inside the update's own pass."""


def _mask_target(params):
  # A mask is given the params' tree, also when the params arrive packed.
  return params.layout.tree_shape_dtypes() if isinstance(params, Packed) else params


def _transformation(spec: _core.OptimizerSpec, layout: str) -> optax.GradientTransformationExtraArgs:
  """The optimizer of ``spec``: tree or flat state for tree params; for packed
  params (:class:`jadam.Packed`, e.g. ``DataParallel(layout="flat")``) state
  packed like them, one fused pass per buffer; for ZeRO's slices, the
  strategy's own update of the slices."""
  fn = spec.name
  use_wd = spec.uses_weight_decay()
  scale_lr = spec.learning_rate is not None

  def init_fn(params):
    tree = _mask_target(params)
    if spec.mask is not None:
      V.resolve_mask(fn, spec.mask, tree)  # errors at init, not mid-training
    if layout == "flat" and not isinstance(params, Packed):
      inner = _flat.init_flat_state(fn, spec, params)
    else:
      inner = _core.init_state(fn, spec.rule, params, spec.mu_dtype, spec.nu_dtype)
    return _optax_state.init(spec, tree, inner)

  def update_fn(updates, state, params=None, **extra_args):
    inner, rebuild = _optax_state.split(fn, spec.rule, state)
    decay_mask = None
    if use_wd and spec.mask is not None and params is not None:
      decay_mask = tuple(V.resolve_mask(fn, spec.mask, _mask_target(params)))
    slices = extra_args.get(SLICES_ARG)
    hp = spec.hyper()  # schedules are evaluated inside the update's jit
    rule = spec.rule
    exchange = extra_args.get(EXCHANGE_ARG)
    grad_scale = extra_args.get(GRAD_SCALE_ARG)
    if grad_scale is not None and exchange is not None:
      # The exchange reads the gradient itself: unscale it first (in float32).
      updates = jax.tree.map(lambda g: g.astype(jnp.float32) * grad_scale, updates)
    elif grad_scale is not None:
      hp = hp._replace(grad_scale=grad_scale)
    if exchange is not None:
      updates, rule = exchange.exchange(spec, inner, updates)
    if slices is not None:
      updates, inner, finite = slices.update(spec, hp, decay_mask, updates, inner, params)
    elif isinstance(updates, Packed):
      updates, inner, finite = _flat.packed_update(
          fn, rule, hp, updates, inner, params, decay_mask=decay_mask, scale_lr=scale_lr)
    elif layout == "flat":
      updates, inner, finite = _flat.flat_update(
          fn, rule, hp, updates, inner, params, decay_mask=decay_mask, scale_lr=scale_lr)
    else:
      updates, inner, finite = _core.tree_update(
          fn, rule, hp, updates, inner, params, decay_mask=decay_mask, scale_lr=scale_lr)
    return updates, rebuild(inner, finite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build(spec: _core.OptimizerSpec, layout: str, skip_nonfinite: bool = False,
          master_weights: str | None = None,
          kernel: str = "auto") -> optax.GradientTransformationExtraArgs:
  spec.validate()
  V.check_choice(spec.name, "layout", layout, LAYOUTS)
  V.check_choice(spec.name, "kernel", kernel, _rule.KERNELS)
  skip_nonfinite = V.check_bool(spec.name, "skip_nonfinite", skip_nonfinite)
  _master.check_format(spec.name, "master_weights", master_weights)
  if master_weights is not None and spec.learning_rate is None:
    raise ValueError(
        f"`{spec.name}(master_weights=...)`: master weights take the optimizer's whole "
        "update, learning rate included; scale_by_adam has none (use jadam.adam, or "
        "another jadam optimizer with a learning rate, as the chain's last part)")
  spec = spec._replace(
      rule=dataclasses.replace(spec.rule, skip_nonfinite=skip_nonfinite,
                               master=master_weights, kernel=kernel),
      mu_dtype=_quant.resolve(spec.name, "mu_dtype", spec.mu_dtype),
      nu_dtype=_quant.resolve(spec.name, "nu_dtype", spec.nu_dtype),
  )
  tx = _transformation(spec, layout)
  # Layout-independent description, found through optax's wrappers (chain,
  # apply_if_finite) by the identity of the update function they keep.
  _compose.register_jadam(tx, spec)
  return tx


def optimizer_spec(tx) -> _core.OptimizerSpec | None:
  """The :class:`OptimizerSpec` of the jadam optimizer in ``tx`` (bare, or the
  one jadam optimizer inside an ``optax.chain`` or ``optax.apply_if_finite``),
  or None."""
  return _compose.jadam_spec(tx)
