"""A NumPy reference of one step of jadam's rule (jadam._rule), in float32.

Every operation of the rule, in its order, each rounded to float32 (NumPy
never contracts a multiply-add into an FMA): the arithmetic the fused kernel
promises to do, bit for bit. The step's scalars (bias corrections, RAdam's
rectification) come in as computed by the step itself.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def step(kind: str, nesterov: bool, s: dict, g, moments, p, decay: bool, apply: bool):
  """``(out, new_moments)``: the update (or with ``apply`` the new params,
  rounded to ``p``'s dtype) and the new moments, from float32 scalars ``s``
  named as in ``jadam._kernel._ffi.SCALARS``."""
  s = {k: F32(v) for k, v in s.items()}
  g = np.asarray(g).astype(F32) * s["grad_scale"]
  m = [np.asarray(x).astype(F32) for x in moments]
  mu = s["c1"] * g + s["b1"] * m[0]
  new = [mu]
  if kind == "adamax":
    nu = np.maximum(np.abs(g) + s["eps"], s["b2"] * m[1])
    new.append(nu)
    d = (mu / s["bc_mu"]) / nu
  else:
    nu = s["c2"] * (g * g) + s["b2"] * m[1]
    new.append(nu)
    nu_hat = nu / s["bc_nu"]
    if kind == "amsgrad":
      nu_hat = np.maximum(m[2], nu_hat)
      new.append(nu_hat)
    denom = np.sqrt(nu_hat + s["eps_root"]) + s["eps"]
    if nesterov:
      mu_hat = s["b1"] * (mu / s["bc_mu_next"]) + s["c1"] * (g / s["bc_mu"])
    else:
      mu_hat = mu / s["bc_mu"]
    if kind == "radam":
      d = (s["radam_r"] * mu_hat) / denom if s["radam_on"] else mu_hat
    else:
      d = mu_hat / denom
  p32 = np.asarray(p).astype(F32)
  if decay:
    d = d + s["wd"] * p32
  out = p32 + s["neg_lr"] * d if apply else s["neg_lr"] * d
  dtype = np.asarray(p).dtype if apply else F32
  return out.astype(dtype), [x.astype(np.asarray(y).dtype) for x, y in zip(new, moments)]
