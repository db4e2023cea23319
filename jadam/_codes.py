"""Code maps of quantized moments: the sorted tables codes index, the
nearest-code rounding, and 4-bit codes packed two per byte.

* *dynamic* (Dettmers et al. 2022; the "DE" map of Li et al. 2023): one,
  and per decimal exponent (decade) evenly spaced fraction levels, twice as
  many per decade as the one below (fine near zero, coarse near one),
  mirrored for signed values (with zero); unsigned, no zero code but half
  the smallest level;
* *linear*: evenly spaced over [-1, 1], or ``(i + 1) / 2**bits`` for unsigned
  values (no zero code: ``1 / sqrt(nu)`` stays finite).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def code_map(bits: int, code: str, signed: bool) -> np.ndarray:
  """The sorted table of ``2 ** bits`` values that codes index.

  ``dynamic``: one, and for each decade ``10**-k`` (``k`` from ``bits - 2``
  down to 0) linear fraction levels at the midpoints of an even split of
  [0.1, 1]; each decade has twice the levels of the one below it (twice
  again when unsigned: no sign bit). Signed: mirrored for negative values,
  and zero. Unsigned: no zero, but half the smallest level.
  ``linear``: evenly spaced over [-1, 1] (signed) or ``(i + 1) / 2**bits``
  (unsigned: no zero).

  Unsigned maps (``nu``) never hold zero (Li et al. 2023's zero-point
  problem): an element whose ``nu`` rounds to zero in a block with a large
  one would take a step ``mu / eps``, or with bias correction one that grows
  like the square root of the step count. The smallest code keeps
  ``1 / sqrt(nu)`` bounded by the block's scale.
  """
  n = 1 << bits
  if code == "linear":
    table = np.linspace(-1.0, 1.0, n) if signed else np.arange(1, n + 1) / n
    return np.asarray(table, np.float32)
  levels, scales, _ = _dynamic_parts(bits, signed)
  positive = np.concatenate([
      s * (0.1 + (np.arange(k) + 0.5) * 0.9 / k) for k, s in zip(levels, scales)])
  if signed:
    values = np.concatenate([-positive, positive, [0.0]])
  else:  # no zero: the lowest code is half the smallest level
    values = np.concatenate([positive, [positive.min() / 2]])
  table = np.sort(np.concatenate([values, [1.0]]))
  assert table.size == n, (bits, code, signed, table.size)
  return table.astype(np.float32)


def max_error(table: np.ndarray, signed: bool) -> float:
  """The largest ``|x - decode(encode(x))|`` over normalized ``x`` (in
  [-1, 1] or [0, 1]) with round-to-nearest: half the widest gap between
  neighbouring codes, or the distance from an end of the range to the
  nearest code."""
  t = np.asarray(table, np.float64)
  low = -1.0 if signed else 0.0
  return float(max(np.max(np.diff(t)) / 2, t[0] - low, 1.0 - t[-1]))


def nearest(x: jax.Array, bits: int, code: str, signed: bool) -> jax.Array:
  """Index (uint8) of the code nearest to each normalized value.

  Closed form, element-wise with constants only (a search of the table
  costs a gather per bit; this fuses into the update's one pass): the
  linear maps round an affine function; the dynamic map first picks the
  decade (comparing with the midpoints between decades), then rounds
  within it (its levels are evenly spaced there).
  """
  n = 1 << bits
  if code == "linear":
    if signed:
      idx = jnp.round((x + 1) * ((n - 1) / 2))
    else:
      idx = jnp.round(x * n) - 1
    return jnp.clip(idx, 0, n - 1).astype(jnp.uint8)
  levels, scales, thresholds = _dynamic_parts(bits, signed)
  a = jnp.abs(x)
  group = sum((a > t).astype(jnp.int32) for t in thresholds)  # 0: zero, E + 1: one
  decades = len(levels)
  d = jnp.clip(group - 1, 0, decades - 1)
  scale = _select(d, scales)
  count = _select(d, [float(c) for c in levels])
  j = jnp.clip(jnp.round((a / scale - 0.1) * (count / 0.9) - 0.5), 0, count - 1)
  offset = _select(d, [float(o) for o in np.cumsum([0] + list(levels[:-1]))])
  total = sum(levels)
  rank = jnp.where(group == 0, 0.0, 1.0 + offset + j)
  if not signed:
    return jnp.where(group > decades, total + 1.0, rank).astype(jnp.uint8)
  # Signed: [-largest .. -smallest, 0, smallest .. largest, 1]; no -1.
  positive = jnp.where(group > decades, total + 1.0, rank)
  negative = jnp.minimum(rank, total)
  return jnp.where(x >= 0, total + positive, total - negative).astype(jnp.uint8)


def _select(index: jax.Array, values) -> jax.Array:
  """``values[index]`` for a short list of Python constants, without a gather."""
  out = jnp.full(index.shape, values[0], jnp.float32)
  for i, v in enumerate(values[1:], 1):
    out = jnp.where(index == i, jnp.float32(v), out)
  return out


@functools.lru_cache(maxsize=None)
def _dynamic_parts(bits: int, signed: bool):
  """The dynamic map's decades: levels per decade, each decade's scale, and
  the thresholds between zero, the decades and one (midpoints between the
  neighbouring codes)."""
  decades = bits - 1
  levels = tuple((1 << i) if signed else (2 << i) for i in range(decades))
  scales = tuple(10.0 ** (i - (decades - 1)) for i in range(decades))

  def value(i, j):
    return scales[i] * (0.1 + (j + 0.5) * 0.9 / levels[i])

  # Below the smallest level: zero (signed) or half that level (unsigned).
  thresholds = [value(0, 0) / 2 if signed else value(0, 0) * 0.75]
  for i in range(decades - 1):
    thresholds.append((value(i, levels[i] - 1) + value(i + 1, 0)) / 2)
  thresholds.append((value(decades - 1, levels[-1] - 1) + 1.0) / 2)
  return levels, scales, tuple(float(np.float32(t)) for t in thresholds)


def pack(idx: jax.Array, bits: int) -> jax.Array:
  """Codes (uint8, last axis of even length for 4 bits) as stored bytes."""
  if bits == 8:
    return idx
  pairs = idx.reshape(*idx.shape[:-1], idx.shape[-1] // 2, 2)
  return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack(codes: jax.Array, bits: int) -> jax.Array:
  if bits == 8:
    return codes
  both = jnp.stack([codes >> 4, codes & 15], axis=-1)
  return both.reshape(*codes.shape[:-1], codes.shape[-1] * 2)
