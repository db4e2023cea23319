"""optax-compatible variants of Adam: AMSGrad, Adamax(W), RAdam and LAMB.

As in :mod:`jadam._optimizers`: optax's arguments and defaults, plus jadam's
keyword-only extras, returning an ``optax.GradientTransformation``.
"""

from typing import Any, Optional

import optax

from . import _core
from . import _rule
from ._optimizers import MaskOrFn
from ._optimizers import Numeric
from ._optimizers import ScalarOrSchedule
from ._optimizers import _build


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    mu_dtype: Optional[Any] = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """AMSGrad: Adam with a running maximum of ``nu``, as ``optax.amsgrad``.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype: as :func:`jadam.adam`.
    bias_correction_mu: bias-correct the first moment.
    bias_correction_nu: bias-correct the second moment (before the maximum).
    nu_dtype: dtype of ``nu`` and ``nu_max`` (jadam extra).
    layout: ``"tree"`` or ``"flat"``.
    skip_nonfinite, master_weights, kernel: jadam extras, as in :func:`jadam.adam`.

  Returns:
    An ``optax.GradientTransformation`` whose state is ``optax.amsgrad``'s own
    tree, ``(optax.ScaleByAmsgradState(count, mu, nu, nu_max), ...)``.

  References:
    Reddi et al., 2018, https://openreview.net/forum?id=ryQu7f-RZ
  """
  return _build(
      _core.OptimizerSpec(
          "amsgrad",
          _rule.Rule("amsgrad", bias_correction_mu=bias_correction_mu,
                     bias_correction_nu=bias_correction_nu),
          learning_rate, b1, b2, eps, eps_root, 0.0, None,
          mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def adamax(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Adamax (Adam with the infinity norm), as ``optax.adamax``.

  ``v_t = \max(|g_t| + \epsilon, \beta_2 v_{t-1})``,
  ``u_t = -\alpha_t \frac{m_t/(1-\beta_1^t)}{v_t}``.

  Args:
    learning_rate, b1, b2, eps: as :func:`jadam.adam`.
    mu_dtype, nu_dtype: moment dtypes (jadam extras).
    layout: ``"tree"`` or ``"flat"``.
    skip_nonfinite, master_weights, kernel: jadam extras, as in :func:`jadam.adam`.

  References:
    Kingma & Ba, 2014, https://arxiv.org/abs/1412.6980 (section 7)
  """
  return _build(
      _core.OptimizerSpec(
          "adamax", _rule.Rule("adamax"), learning_rate, b1, b2, eps, 0.0, 0.0, None,
          mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Adamax with decoupled weight decay, as ``optax.adamaxw``.

  Args: as :func:`jadam.adamax`, plus ``weight_decay`` and ``mask`` as
  :func:`jadam.adamw`.
  """
  return _build(
      _core.OptimizerSpec(
          "adamaxw", _rule.Rule("adamax"), learning_rate, b1, b2, eps, 0.0,
          weight_decay, mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def radam(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    threshold: Numeric = 5.0,
    *,
    nesterov: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Rectified Adam, as ``optax.radam``.

  Args:
    learning_rate, b1, b2, eps, eps_root: as :func:`jadam.adam`.
    threshold: rectify once the approximated SMA length reaches it.
    nesterov: use Nesterov momentum.
    mu_dtype, nu_dtype: moment dtypes (jadam extras).
    layout: ``"tree"`` or ``"flat"``.
    skip_nonfinite, master_weights, kernel: jadam extras, as in :func:`jadam.adam`.

  References:
    Liu et al., 2020, https://arxiv.org/abs/1908.03265
  """
  return _build(
      _core.OptimizerSpec(
          "radam", _rule.Rule("radam", nesterov=nesterov), learning_rate, b1, b2, eps,
          eps_root, 0.0, None, threshold=threshold, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-6,
    eps_root: Numeric = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Any = None,
    layout: str = "tree",
    skip_nonfinite: bool = False,
    master_weights: Optional[str] = None,
    kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """LAMB: AdamW scaled per parameter by the trust ratio ``|p| / |u|``, as ``optax.lamb``.

  Args:
    learning_rate, b1, b2, eps, eps_root: as :func:`jadam.adam`.
    weight_decay, mask: as :func:`jadam.adamw`.
    mu_dtype, nu_dtype: moment dtypes (jadam extras).
    layout: ``"tree"`` or ``"flat"`` (per-parameter norms by segment sums).
    skip_nonfinite, master_weights, kernel: jadam extras, as in :func:`jadam.adam`.

  References:
    You et al., 2020, https://arxiv.org/abs/1904.00962
  """
  return _build(
      _core.OptimizerSpec(
          "lamb", _rule.Rule("adam", trust_ratio=True), learning_rate, b1, b2, eps,
          eps_root, weight_decay, mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      ),
      layout,
      skip_nonfinite,
      master_weights,
      kernel,
  )
