"""A NumPy reference of one step of jadam's rule (jadam._rule), in float32.

Every operation of the rule, in its order, each rounded to float32 (NumPy
never contracts a multiply-add into an FMA): the arithmetic the fused kernel
promises to do, bit for bit. The step's scalars (bias corrections, RAdam's
rectification) come in as computed by the step itself.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32


def step(kind: str, nesterov: bool, s: dict, g, moments, p, decay: bool, apply: bool,
         master=None, frozen: bool = False):
  """``(out, new_moments)``: the update (or with ``apply`` the new params,
  rounded to ``p``'s dtype) and the new moments, from float32 scalars ``s``
  named as in ``jadam._kernel._ffi.SCALARS``. ``master``: ``(format,
  state)`` of master weights (:func:`master_step`); the new state is the last
  of the new moments. ``frozen``: ``nu`` stays as it is (1-bit Adam)."""
  s = {k: F32(v) for k, v in s.items()}
  g = np.asarray(g).astype(F32) * s["grad_scale"]
  m = [np.asarray(x).astype(F32) for x in moments]
  mu = s["c1"] * g + s["b1"] * m[0]
  new = [mu]
  if kind == "adamax":
    nu = m[1] if frozen else np.maximum(np.abs(g) + s["eps"], s["b2"] * m[1])
    new.append(nu)
    d = (mu / s["bc_mu"]) / nu
  else:
    nu = m[1] if frozen else s["c2"] * (g * g) + s["b2"] * m[1]
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
  new = [x.astype(np.asarray(y).dtype) for x, y in zip(new, moments)]
  p32 = np.asarray(p).astype(F32)
  if master is not None:
    p32 = master_decode(master[1], p)
  if decay:
    d = d + s["wd"] * p32
  if master is not None:
    change, applied, state = master_step(master[0], p, p32 + s["neg_lr"] * d)
    return (applied if apply else change), new + [state]
  out = p32 + s["neg_lr"] * d if apply else s["neg_lr"] * d
  dtype = np.asarray(p).dtype if apply else F32
  return out.astype(dtype), new


# ------------------------------------------------------------- master weights
# jadam._master's definitions (the kernel's adam_master.h), in float32.

def ulp(p):
  """The spacing of ``p``'s dtype at ``|p|``, float32: frexp and ldexp."""
  p = np.asarray(p)
  info = ml_dtypes.finfo(p.dtype)  # (NumPy's finfo has no bfloat16)
  a = np.abs(p.astype(F32))
  _, e = np.frexp(a)
  normal = np.ldexp(np.ones_like(a), e - (info.nmant + 1)).astype(F32)
  return np.where(a < F32(info.smallest_normal), F32(info.smallest_subnormal), normal)


def master_decode(state, p):
  """The float32 master value of ``p``."""
  p32 = np.asarray(p).astype(F32)
  state = np.asarray(state)
  if state.dtype == np.int8:
    return p32 + state.astype(F32) * (ulp(p) / F32(256))
  return p32 + state


def master_step(fmt: str, p, master):
  """``(change, new_param, state)`` for the new float32 ``master`` value of
  ``p``: the param's change (float32), the master value rounded once (through
  ``p + change``), and what that new param lacks of it."""
  p = np.asarray(p)
  p32 = p.astype(F32)
  change = master.astype(p.dtype).astype(F32) - p32
  applied = (p32 + change).astype(p.dtype)
  lost = master - applied.astype(F32)
  if fmt == "float32":
    return change, applied, lost
  with np.errstate(invalid="ignore"):
    q = np.clip(np.round(lost / ulp(applied) * F32(256)), -128, 127)
  return change, applied, np.where(np.isnan(q), 0, q).astype(np.int8)
