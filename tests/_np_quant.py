"""A NumPy reference of block-wise quantized moments (jadam._quant,
jadam._codes) in float32: decode codes and block scales, and encode values
into them, every operation rounded to float32 as the fused kernel promises
(adam_quant.h). Written from the formats' definitions: the sorted code map,
one absmax per block (zero padding at a tensor's end), the closed-form
nearest code, 4-bit codes two per byte (high nibble first)."""

from __future__ import annotations

import numpy as np

from jadam import _codes

F32 = np.float32


def unpack(codes: np.ndarray, bits: int) -> np.ndarray:
  codes = np.asarray(codes).reshape(-1)
  if bits == 8:
    return codes.astype(np.int64)
  return np.stack([codes >> 4, codes & 15], axis=-1).reshape(-1).astype(np.int64)


def decode(codes, scales, fmt, n: int) -> np.ndarray:
  """The first ``n`` values of a block-wise quantized moment, float32."""
  table = np.asarray(fmt.table, F32)
  idx = unpack(codes, fmt.bits)
  scale = np.repeat(np.asarray(scales, F32).reshape(-1), fmt.block_size)
  return (table[idx] * scale)[:n]


def nearest(x: np.ndarray, bits: int, code: str, signed: bool) -> np.ndarray:
  """Index of each normalized float32 value's code."""
  x = np.asarray(x, F32)
  n = F32(1 << bits)
  with np.errstate(invalid="ignore"):
    if code == "linear":
      idx = np.round((x + F32(1)) * F32((n - 1) / 2)) if signed else np.round(x * n) - F32(1)
      idx = np.where(np.isnan(idx), F32(0), np.clip(idx, F32(0), n - F32(1)))
      return idx.astype(np.uint8)
    levels, scales, thresholds = _codes._dynamic_parts(bits, signed)  # pylint: disable=protected-access
    a = np.abs(x)
    group = sum((a > F32(t)).astype(np.int64) for t in thresholds)
    d = np.clip(group - 1, 0, len(levels) - 1)
    scale = np.asarray(scales, F32)[d]
    count = np.asarray(levels, F32)[d]
    offset = np.asarray(np.cumsum([0] + list(levels[:-1])), F32)[d]
    j = np.round((a / scale - F32(0.1)) * (count / F32(0.9)) - F32(0.5))
    j = np.minimum(np.maximum(j, F32(0)), count - F32(1))
    total = F32(sum(levels))
    rank = np.where(group == 0, F32(0), F32(1) + offset + j)
    positive = np.where(group > len(levels), total + F32(1), rank)
    if not signed:
      return positive.astype(np.uint8)
    negative = np.minimum(rank, total)
    return np.where(x >= 0, total + positive, total - negative).astype(np.uint8)


def encode(x, fmt) -> tuple[np.ndarray, np.ndarray]:
  """``(codes, scales)`` of float32 values ``x`` (flat), block-wise, the last
  block padded with zeros: codes as stored (uint8, 4-bit codes packed)."""
  x = np.asarray(x, F32).reshape(-1)
  b = fmt.block_size
  blocks = np.pad(x, (0, -x.size % b)).reshape(-1, b)
  absmax = np.max(np.abs(blocks), axis=1)  # NaN if a block holds one
  with np.errstate(invalid="ignore", divide="ignore"):
    xn = np.where(absmax[:, None] > 0, blocks / np.where(absmax > 0, absmax, F32(1))[:, None],
                  F32(0))
  idx = nearest(xn, fmt.bits, fmt.code, bool(fmt.signed)).reshape(-1)
  if fmt.bits == 4:
    idx = ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)
  return idx, absmax.astype(F32)


# ------------------------------------------------------------- rank-1
# A tensor of two or more dimensions: per dimension the maximum |value| over
# all others; each element's norm, the minimum of its dimensions' maxima (in
# order, NaN propagating); codes over the whole tensor, the last nibble of an
# odd count the code of 0.

def rank1_norm(stats) -> np.ndarray:
  k = len(stats)
  out = None
  for i, s in enumerate(stats):
    s = np.asarray(s, F32).reshape((1,) * i + (-1,) + (1,) * (k - i - 1))
    out = s if out is None else np.minimum(out, s)
  return out


def decode_rank1(codes, stats, fmt, view) -> np.ndarray:
  """A rank-1 moment of shape ``view`` as float32 values (flat)."""
  n = int(np.prod(view))
  idx = unpack(codes, fmt.bits)[:n].reshape(view)
  return (np.asarray(fmt.table, F32)[idx] * rank1_norm(stats)).reshape(-1)


def encode_rank1(x, fmt, view):
  """``(codes, stats)`` of float32 values ``x`` of shape ``view``."""
  t = np.asarray(x, F32).reshape(view)
  a = np.abs(t)
  stats = [np.max(a, axis=tuple(j for j in range(a.ndim) if j != i)).astype(F32)
           for i in range(a.ndim)]
  norm = rank1_norm(stats)
  with np.errstate(invalid="ignore", divide="ignore"):
    xn = np.where(norm > 0, t / np.where(norm > 0, norm, F32(1)), F32(0)).reshape(-1)
  if fmt.bits == 4:
    xn = np.pad(xn, (0, xn.size % 2))
  idx = nearest(xn, fmt.bits, fmt.code, bool(fmt.signed))
  if fmt.bits == 4:
    idx = ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)
  return idx, stats
