"""The Adam family's per-element rule, written once and shared by every layout.

A step has two parts:

* :func:`step_scalars` — the per-step scalars (bias corrections, RAdam's
  rectification), computed once per step in float32 from the hyperparameters
  and the incremented count;
* :func:`element_update` — the elementwise part: new moments and the update
  direction (before the learning rate), on arrays of any shape. The tree
  layout calls it once per leaf, the flat layout once per packed buffer, the
  ZeRO layout once per device slice.

The expressions follow optax's own (same operations in the same order), so in
float32 jadam and optax agree bit for bit. Low-precision params (bfloat16,
float16) are upcast to float32 inside the rule: eps, betas and bias
corrections never round to the params' dtype (optax issue 1754: in float16,
``eps=1e-8`` rounds to 0 and a zero gradient gives 0/0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _master

KINDS = ("adam", "amsgrad", "adamax", "radam")
KERNELS = ("auto", "xla", "fused")
AUTO_ANYWHERE = "auto_anywhere"
"""``"auto"`` resolved under ``JADAM_KERNEL=fused``: the kernel wherever it can
run (internal; :func:`jadam._kernel.effective_rule`)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Static (hashable) description of one Adam-family element rule.

  Attributes:
    kind: ``"adam"``, ``"amsgrad"`` (keeps ``nu_max``), ``"adamax"`` (``nu`` is
      the infinity norm) or ``"radam"`` (rectified).
    nesterov: Nesterov momentum (NAdam), for ``adam`` and ``radam``.
    bias_correction_mu: divide ``mu`` by ``1 - b1**t`` (amsgrad may turn it off).
    bias_correction_nu: divide ``nu`` by ``1 - b2**t`` (amsgrad may turn it off).
    trust_ratio: scale each parameter's update by ``|p| / |u|`` (LAMB).
    nu_frozen_at: ``0`` (``nu`` updates every step) or the step at which
      ``nu`` froze (1-bit Adam's compression phase): ``nu`` (and ``nu_max``)
      keep their values, and ``nu``'s bias correction and RAdam's
      rectification stay those of that step.
    skip_nonfinite: a step whose gradient holds a NaN or an inf changes
      nothing: zero updates, the moments and the count as they were.
    master: ``None``, ``"float32"`` or ``"q8"``: master weights (see
      :mod:`jadam._master`), kept in the state as ``master``.
    kernel: how the step runs, not what it computes: ``"auto"``, ``"xla"``
      or ``"fused"`` (see :mod:`jadam._kernel`).
  """

  kind: str = "adam"
  nesterov: bool = False
  bias_correction_mu: bool = True
  bias_correction_nu: bool = True
  trust_ratio: bool = False
  nu_frozen_at: int = 0
  skip_nonfinite: bool = False
  master: str | None = None
  kernel: str = "auto"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Rule(kind=...) must be one of {KINDS}, got {self.kind!r}")
    if self.kernel not in KERNELS + (AUTO_ANYWHERE,):
      raise ValueError(f"Rule(kernel=...) must be one of {KERNELS}, got {self.kernel!r}")
    _master.check_format("Rule", "master", self.master)
    if not isinstance(self.nu_frozen_at, int) or self.nu_frozen_at < 0:
      raise ValueError(
          f"Rule(nu_frozen_at=...) must be a non-negative int, got {self.nu_frozen_at!r}")

  @property
  def optax_names(self) -> tuple[str, ...]:
    """Names of the per-parameter fields of optax's moments node."""
    return ("mu", "nu", "nu_max") if self.kind == "amsgrad" else ("mu", "nu")

  @property
  def moment_names(self) -> tuple[str, ...]:
    """Names of the per-parameter state fields, in state order (the master
    weights' state last)."""
    return self.optax_names + (("master",) if self.master else ())


class Hyper(NamedTuple):
  """Hyperparameter values at one step (Python floats or float32 scalars).

  Schedules are already evaluated. ``weight_decay`` is the unmasked value; a
  layout applies its mask.
  """

  learning_rate: Any
  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  weight_decay: Any
  threshold: Any = 5.0
  grad_scale: Any = None  # multiplies the gradient in the pass (1 / loss scale)


class StepScalars(NamedTuple):
  """Per-step float32 scalars shared by every element of one step."""

  bc_mu: Any  # 1 - b1**t (or None: no correction)
  bc_mu_next: Any  # 1 - b1**(t+1), for Nesterov
  bc_nu: Any  # 1 - b2**t (or None)
  radam_r: Any  # rectification factor (RAdam)
  radam_on: Any  # whether rectification applies this step (RAdam)


def safe_increment(count: jax.Array) -> jax.Array:
  """``count + 1`` saturating at the dtype's maximum (as optax does)."""
  if not jnp.issubdtype(count.dtype, jnp.integer):
    raise TypeError(
        "the optimizer state's step `count` must be an integer array (int32, "
        f"as `init` makes it), got {count.dtype}: was the state built or "
        "converted by hand? Start from `optimizer.init(params)`")
  max_value = jnp.array(jnp.iinfo(count.dtype).max, count.dtype)
  return jnp.where(count < max_value, count + jnp.array(1, count.dtype), max_value)


def compute_dtype(dtype) -> np.dtype:
  """The dtype the rule computes in: at least float32 (complex64 for complex)."""
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return np.dtype(jnp.promote_types(dtype, jnp.complex64))
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def step_scalars(rule: Rule, hp: Hyper, count_inc: jax.Array) -> StepScalars:
  """Bias corrections and RAdam rectification for the step numbered ``count_inc``.

  Constants that optax computes in Python (double precision) from Python-float
  hyperparameters are computed here the same way; the rest runs in one jitted
  function, so eager and jitted steps give bit-identical scalars.
  """
  ro_inf = ro_c = None
  if rule.kind == "radam":
    ro_inf = 2.0 / (1.0 - hp.b2) - 1.0
    ro_c = (ro_inf - 4.0) * (ro_inf - 2.0)
  return _step_scalars(rule, hp.b1, hp.b2, hp.threshold, ro_inf, ro_c, count_inc)


@functools.partial(jax.jit, static_argnums=0, inline=True)
def _step_scalars(rule: Rule, b1, b2, threshold, ro_inf, ro_c, count_inc) -> StepScalars:
  bc_mu = 1 - b1**count_inc if rule.bias_correction_mu else None
  bc_mu_next = 1 - b1 ** safe_increment(count_inc) if rule.nesterov else None
  # A frozen nu keeps the corrections of the step it froze at (computed from
  # the traced count, so the same pow runs as at that step: XLA folds a
  # constant's pow differently, a relative 1e-5 apart at small steps).
  count_nu = (jnp.minimum(count_inc, rule.nu_frozen_at).astype(count_inc.dtype)
              if rule.nu_frozen_at else count_inc)
  bc_nu = 1 - b2**count_nu if rule.bias_correction_nu else None
  radam_r = radam_on = None
  if rule.kind == "radam":
    b2t = b2**count_nu
    ro = ro_inf - 2 * count_nu * b2t / (1 - b2t)
    radam_r = jnp.sqrt((ro - 4.0) * (ro - 2.0) * ro_inf / (ro_c * ro))
    radam_on = ro >= threshold
  return StepScalars(bc_mu, bc_mu_next, bc_nu, radam_r, radam_on)


def _bias_correct(x, bc):
  # Division in x's dtype (the compute dtype: never below float32).
  return x if bc is None else x / bc.astype(x.dtype)


def element_update(
    rule: Rule,
    hp: Hyper,
    scalars: StepScalars,
    g: jax.Array,
    moments: tuple[jax.Array, ...],
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """One element-wise step of the rule.

  Args:
    rule: the static rule.
    hp: hyperparameter values at this step.
    scalars: :func:`step_scalars` for this step.
    g: gradient (any shape, any float or complex dtype).
    moments: the state arrays named by ``rule.moment_names``, shaped like ``g``.

  Returns:
    ``(direction, new_moments)``: the Adam direction in the compute dtype
    (before weight decay, trust ratio and learning rate), and the new moments,
    each cast back to its stored dtype.
  """
  cdt = compute_dtype(g.dtype)
  g = g.astype(cdt)
  if hp.grad_scale is not None:  # a loss-scaled gradient, unscaled in float32
    g = g * jnp.asarray(hp.grad_scale, jnp.float32).astype(cdt)
  mu_old = moments[0].astype(cdt)
  nu_old = moments[1].astype(cdt)
  b1, b2, eps, eps_root = hp.b1, hp.b2, hp.eps, hp.eps_root

  mu = (1 - b1) * g + b1 * mu_old
  frozen = bool(rule.nu_frozen_at)
  if rule.kind == "adamax":
    nu = nu_old if frozen else jnp.maximum(jnp.abs(g) + eps, b2 * nu_old)
    direction = _bias_correct(mu, scalars.bc_mu) / nu
    return direction, (mu.astype(moments[0].dtype), nu.astype(moments[1].dtype))

  if frozen:
    nu = nu_old
  else:
    g2 = g**2 if jnp.isrealobj(g) else (g.conj() * g).real
    nu = (1 - b2) * g2 + b2 * nu_old
  if rule.nesterov:
    mu_hat = b1 * _bias_correct(mu, scalars.bc_mu_next) + (1 - b1) * _bias_correct(
        g, scalars.bc_mu
    )
  else:
    mu_hat = _bias_correct(mu, scalars.bc_mu)
  nu_hat = _bias_correct(nu, scalars.bc_nu)
  new_moments = (mu.astype(moments[0].dtype), nu.astype(moments[1].dtype))

  if rule.kind == "amsgrad":
    nu_max = jnp.maximum(moments[2].astype(cdt), nu_hat)
    direction = mu_hat / (jnp.sqrt(nu_max + eps_root) + eps)
    return direction, new_moments + (nu_max.astype(moments[2].dtype),)

  denom = jnp.sqrt(nu_hat + eps_root) + eps
  if rule.kind == "radam":
    rectified = scalars.radam_r.astype(mu_hat.dtype) * mu_hat / denom
    return jnp.where(scalars.radam_on, rectified, mu_hat), new_moments
  return mu_hat / denom, new_moments


def trust_ratio(param_norm: jax.Array, update_norm: jax.Array) -> jax.Array:
  """LAMB's trust ratio ``|p| / |u|``, 1 where either norm is 0."""
  zero = jnp.logical_or(param_norm == 0.0, update_norm == 0.0)
  return jnp.where(zero, jnp.ones_like(param_norm), param_norm / update_norm)
