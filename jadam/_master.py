"""Master weights for low-precision params: the float32 value each param
stands for, kept as what it lacks.

The state holds, per param element, the difference between the float32
master value and the param (the master value rounded to the param's dtype):

* ``"float32"``: the difference itself, float32 (4 bytes): ``param +
  difference`` is the master value exactly (both are close, so the
  difference of two floats is exact: Sterbenz).
* ``"q8"``: the difference in units of 1/256 of the param's last place
  (ulp), a signed 8-bit integer (1 byte): ``param + q ulp / 256`` is the
  master value to within 1/256 of an ulp (the rounding error of a param
  rounded to nearest is at most half an ulp: ``|q| <= 128``, clipped to 127;
  rounding ``q`` costs at most 1/512).

Both start at zero (the master value is the param). Each step adds the
update to the master value in float32, rounds it once to the param's dtype
for the new param, and keeps what the rounding lost: an update far below a
bfloat16 param's last place is never lost, it accumulates until it moves the
param.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("float32", "q8")
_DTYPES = {"float32": np.dtype(np.float32), "q8": np.dtype(np.int8)}


def check_format(fn: str, name: str, value) -> None:
  """Raises a ValueError naming the argument unless ``value`` is ``None`` or
  one of :data:`FORMATS`."""
  if value is not None and value not in FORMATS:
    raise ValueError(f"`{fn}({name}=...)` must be None, 'float32' or 'q8', got {value!r}")


def state_dtype(fmt: str) -> np.dtype:
  """The dtype of the master state of format ``fmt``."""
  return _DTYPES[fmt]


def ulp(param: jax.Array) -> jax.Array:
  """The spacing of the param's dtype at ``|param|`` (its last place), float32."""
  info = jnp.finfo(param.dtype)
  a = jnp.abs(param.astype(jnp.float32))
  _, e = jnp.frexp(a)  # a = m 2**e, m in [0.5, 1)
  normal = jnp.ldexp(jnp.ones_like(a), e - (info.nmant + 1))
  subnormal = jnp.asarray(info.smallest_subnormal, jnp.float32)
  return jnp.where(a < jnp.asarray(info.smallest_normal, jnp.float32), subnormal, normal)


def decode(state: jax.Array, param: jax.Array) -> jax.Array:
  """The float32 master value of ``param`` (any float dtype)."""
  p = param.astype(jnp.float32)
  if state.dtype == jnp.int8:
    return p + state.astype(jnp.float32) * (ulp(param) / 256)
  return p + state


def residual(fmt: str, master: jax.Array, param: jax.Array) -> jax.Array:
  """What ``param`` lacks of the float32 ``master`` value, in format ``fmt``."""
  lost = master - param.astype(jnp.float32)
  if fmt == "float32":
    return lost
  q = jnp.round(lost / ulp(param) * 256)
  return jnp.clip(q, -128, 127).astype(jnp.int8)


def step(fmt: str, master: jax.Array, param: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(update, state)`` for the new float32 ``master`` value of ``param``.

  ``update`` (float32) is the param's change: ``optax.apply_updates`` adds
  it in float32 and rounds once, which gives the master value rounded to the
  param's dtype (a param-dtype update could not always carry the change
  exactly, say where a param crosses zero). ``state`` is what that new
  param lacks of the master value.
  """
  target = master.astype(param.dtype)
  update = target.astype(jnp.float32) - param.astype(jnp.float32)
  applied = (param.astype(jnp.float32) + update).astype(param.dtype)
  return update, residual(fmt, master, applied)
