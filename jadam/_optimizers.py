"""optax-compatible Adam-family optimizers.

Each function has exactly the arguments and defaults of the optax function of
the same name, plus jadam's keyword-only extras (``mu_dtype``/``nu_dtype``
where optax lacks them, ``layout``, ``skip_nonfinite``), and returns an
``optax.GradientTransformation`` usable in ``optax.chain``, Flax's
``TrainState`` and ``nnx.Optimizer``.
"""

from typing import Any, Optional

import jax
import optax

from . import _core
from . import _rule
from ._transformation import build as _build

# optax's own annotation objects (evaluated, not strings): code that inspects
# annotations treats jadam's factories as optax's.
ScalarOrSchedule = optax.ScalarOrSchedule
MaskOrFn = optax.MaskOrFn
Numeric = jax.typing.ArrayLike


def scale_by_adam(
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Adam's rule (no learning rate): ``optax.scale_by_adam``.

  Args:
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the denominator outside the square root (>= 0).
    eps_root: added inside the square root (>= 0).
    mu_dtype: dtype of the first moment (default: the params'), or a
      quantized format (jadam extra): ``"q8"`` (8-bit codes in blocks of 256,
      one float32 absmax per block, a dynamic code map), ``"q4"`` (4-bit,
      blocks of 128) or a :class:`jadam.Quantized`. Leaves under
      ``min_quantized_size`` (4096) elements keep float32 moments; the state
      holds a :class:`jadam.QArray` (codes and scales) for the others.
    nesterov: use Nesterov momentum.
    nu_dtype: dtype of the second moment (jadam extra), or a quantized
      format: ``"q8"``, or ``"q4"`` (4-bit, rank-1 normalized over a
      matrix's rows and columns, a linear map without zero).
    layout: ``"tree"`` (optax's state layout) or ``"flat"`` (packed state).
    skip_nonfinite, master_weights, kernel: jadam extras, as in :func:`jadam.adam`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import optax, jadam
    >>> tx = optax.chain(jadam.scale_by_adam(), optax.scale(-1e-3))

  References:
    Kingma & Ba, 2014, https://arxiv.org/abs/1412.6980
  """
  return _build(
      _core.OptimizerSpec(
          "scale_by_adam", _rule.Rule("adam", nesterov=nesterov), None, b1, b2, eps,
          eps_root, 0.0, None, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""The Adam optimizer, interchangeable with ``optax.adam``.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = -\alpha_t \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)+\epsilon_{root}}+\epsilon}

  Unlike optax, eps, betas and bias corrections stay float32 for float16 and
  bfloat16 params, so float16 params with zero gradients never give NaN.

  Args:
    learning_rate: a float, a scalar array or an optax schedule (>= 0).
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the denominator outside the square root (>= 0).
    eps_root: added inside the square root (>= 0).
    mu_dtype: dtype of the first moment (default: the params').
    nesterov: use Nesterov momentum (NAdam).
    nu_dtype: dtype of the second moment (jadam extra; default: the params').
    layout: ``"tree"`` (optax's state layout) or ``"flat"`` (packed state).
    skip_nonfinite: skip a step whose gradient holds a NaN or inf (jadam extra):
      zero updates, params and moments unchanged, the count not advanced;
      the state is then ``optax.apply_if_finite``'s, with its counters.
    master_weights: for bfloat16/float16 params (jadam extra): ``None``,
      ``"float32"`` (the float32 value each param stands for, kept as its
      float32 rounding error: 4 bytes) or ``"q8"`` (that error in 1/256 of
      the param's last place: 1 byte); updates below a param's last place
      are never lost. The state gains a ``jadam.MasterState``.
    kernel: how the step runs on CPU (jadam extra): ``"xla"`` (XLA's ops),
      ``"fused"`` (a fused C++ kernel, one pass over all leaves, moments and
      params in place with ``jadam.step``; agrees with XLA's ops to float32
      rounding; a ``ValueError`` says why where it cannot run) or ``"auto"``
      (default: the kernel for in-place steps, ``jadam.step``, and XLA's ops
      for the updates this transformation returns, which stay optax's bits;
      ``JADAM_KERNEL=fused`` makes it the kernel wherever the kernel can run,
      ``JADAM_KERNEL=xla`` never). Without a C++
      compiler every mode runs XLA's ops (one logged notice). See
      :mod:`jadam._kernel`.

  Returns:
    An ``optax.GradientTransformation`` whose state is ``optax.adam``'s own
    tree, ``(optax.ScaleByAdamState(count, mu, nu), ...)``.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-3))
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Kingma & Ba, 2014, https://arxiv.org/abs/1412.6980

  .. seealso:: :func:`jadam.adamw`, :func:`jadam.nadam`, :func:`jadam.step`.
  """
  return _build(
      _core.OptimizerSpec(
          "adam", _rule.Rule("adam", nesterov=nesterov), learning_rate, b1, b2, eps,
          eps_root, 0.0, None, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = True,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """NAdam: Adam with Nesterov momentum, interchangeable with ``optax.nadam``.

  Args: as :func:`jadam.adam` (``nesterov`` defaults to True).

  References:
    Dozat, 2016, https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ
  """
  return _build(
      _core.OptimizerSpec(
          "nadam", _rule.Rule("adam", nesterov=nesterov), learning_rate, b1, b2, eps,
          eps_root, 0.0, None, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with decoupled weight decay, interchangeable with ``optax.adamw``.

  ``u_t = -\alpha_t (\mathrm{adam\_direction}_t + \lambda p_{t-1})``.

  Args:
    learning_rate: a float, a scalar array or an optax schedule (>= 0).
    b1, b2, eps, eps_root, mu_dtype: as :func:`jadam.adam`.
    weight_decay: decay rate :math:`\lambda` (>= 0) or a schedule.
    mask: a tree of bools shaped like (a prefix of) the params, or a callable
      returning one: True where weight decay applies.
    nesterov: use Nesterov momentum (NAdamW).
    nu_dtype: dtype of the second moment (jadam extra).
    layout: ``"tree"`` or ``"flat"``.
    skip_nonfinite, master_weights, kernel: jadam extras, as in :func:`jadam.adam`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jadam
    >>> tx = jadam.adamw(1e-3, weight_decay=0.01, mask=lambda p: {"w": True, "b": False})

  References:
    Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101
  """
  return _build(
      _core.OptimizerSpec(
          "adamw", _rule.Rule("adam", nesterov=nesterov), learning_rate, b1, b2, eps,
          eps_root, weight_decay, mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = True,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """NAdamW: AdamW with Nesterov momentum, interchangeable with ``optax.nadamw``.

  Args: as :func:`jadam.adamw` (``nesterov`` defaults to True).
  """
  return _build(
      _core.OptimizerSpec(
          "nadamw", _rule.Rule("adam", nesterov=nesterov), learning_rate, b1, b2, eps,
          eps_root, weight_decay, mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )
