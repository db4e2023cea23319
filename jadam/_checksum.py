"""Checksums of sharded arrays that do not depend on how they are sharded.

A checkpoint is written shard by shard and may be read back onto another
device count, so its checksum must be computable from any set of shards that
covers the array, without gathering it. The checksum of a block of an array is

  sum over its elements e, over the 64-bit words v of e's bytes, of
  mix(i * 0x9E3779B97F4A7C15 ^ v)          (mod 2**64)

where ``i`` is the word's index in the *whole* array (C order; element ``k``
of ``w`` words has words ``k*w .. k*w+w-1``; an element of 1 to 8 bytes is
one zero-extended word, a wider one a word per 8 bytes) and ``mix`` is
SplitMix64's finalizer, a bijection on 64-bit integers. A sum is order free,
so the blocks may be hashed in any order, on any process, and added; the
global index makes a moved or swapped element count as a change. A change
of one word always changes the sum; changes of several go unseen with
probability about 2**-64. It reads the raw bytes (-0.0 and 0.0 differ, NaN
payloads count) and costs a few numpy passes over 64K-word blocks (about
1 GB/s of float32 per core here).

A saved array keeps one sum per *cell* of its saving grid (the distinct
shard boundaries along each dimension, written as ``splits``): a restore
onto another sharding sums each restored shard's part of each cell, and the
processes add their sums, so a mismatch still names the saved shard that is
damaged. Only shards with ``replica_id == 0`` count, so a replicated array
counts once.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Any, Iterator

import jax
import numpy as np

ALGORITHM = "sum-splitmix64-v1"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 16  # words per numpy pass: temporaries stay in cache
_MASK = (1 << 64) - 1


def splits_of(x) -> list[list[int]]:
  """The start of every distinct shard along each dimension of ``x``."""
  shape = tuple(np.shape(x))
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return [[0] for _ in shape]
  starts = [set() for _ in shape]
  for index in sharding.devices_indices_map(shape).values():
    for d, (sl, n) in enumerate(zip(index, shape)):
      starts[d].add(sl.indices(n)[0])
  return [sorted(s) for s in starts]


def cell_sums(x, splits, shape) -> list[int]:
  """This process's part of the checksum of every cell (C order).

  Args:
    x: a ``jax.Array`` (its addressable shards with ``replica_id == 0``
      count) or a host array (counted by process 0 only).
    splits: the cell grid (see :func:`splits_of`).
    shape: the global shape the grid divides. ``x`` may be smaller (a read of
      its leading part): its elements count at the same indices.
  """
  shape = tuple(int(n) for n in shape)
  bounds = [list(s) + [n] for s, n in zip(splits, shape)]
  dims = [len(s) for s in splits]
  out = [0] * math.prod(dims)
  for start, data in _local_blocks(x):
    stop = [a + n for a, n in zip(start, data.shape)]
    ranges = [range(bisect.bisect_right(s, a) - 1, bisect.bisect_left(s, b))
              for s, a, b in zip(splits, start, stop)]
    for cell in itertools.product(*ranges):
      lo = [max(a, b[c]) for a, b, c in zip(start, bounds, cell)]
      hi = [min(a, b[c + 1]) for a, b, c in zip(stop, bounds, cell)]
      if any(l >= h for l, h in zip(lo, hi)):
        continue
      part = data[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))]
      i = int(np.ravel_multi_index(cell, dims)) if dims else 0
      out[i] = (out[i] + block_sum(part, lo, shape)) & _MASK
  return out


def covered_cells(splits, shape, read_shape) -> list[bool]:
  """Which cells (C order) lie wholly inside a read of ``read_shape``."""
  per_dim = [[end <= r for end in list(s[1:]) + [int(n)]]
             for s, n, r in zip(splits, shape, read_shape)]
  return [all(c) for c in itertools.product(*per_dim)]


def cell_box(splits, shape, index: int) -> tuple[tuple[int, int], ...]:
  """``(start, stop)`` along each dimension of cell ``index`` (C order)."""
  dims = [len(s) for s in splits]
  cell = np.unravel_index(index, dims) if dims else ()
  return tuple((s[c], s[c + 1] if c + 1 < len(s) else int(n))
               for s, n, c in zip(splits, shape, cell))


def block_sum(data: np.ndarray, start, shape) -> int:
  """The checksum of ``data``, the block at ``start`` of an array of
  ``shape``."""
  data = np.asarray(data)
  if data.size == 0:
    return 0
  shape = tuple(int(n) for n in shape)
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  # Trailing dimensions the block spans entirely are contiguous in the whole
  # array: one run per combination of the leading dimensions' indices.
  k = len(shape)
  while k > 0 and data.shape[k - 1] == shape[k - 1]:
    k -= 1
  k = max(k - 1, 0)
  run = math.prod(data.shape[k:])
  outer = data.shape[:k]
  rows = data.reshape(math.prod(outer), run)
  words_per = _words(rows[:1, :1]).shape[1]
  base = sum(int(a) * g for a, g in zip(start[k:], strides[k:]))
  total = 0
  step_cols = min(run, max(1, _CHUNK // words_per))
  step_rows = max(1, _CHUNK // (step_cols * words_per))
  golden = np.arange(step_cols * words_per, dtype=np.uint64) * _GOLDEN
  for r0 in range(0, rows.shape[0], step_rows):
    r1 = min(r0 + step_rows, rows.shape[0])
    first = base + _offsets(outer, start[:k], strides[:k], r0, r1)
    for c0 in range(0, run, step_cols):
      c1 = min(c0 + step_cols, run)
      words = _words(rows[r0:r1, c0:c1])
      # index * golden, as (first word's index) * golden + column * golden
      z = ((first + np.uint64(c0)) * np.uint64(words_per) * _GOLDEN)[:, None]
      z = z + golden[None, :words.shape[1]]
      total += _hash_sum(z, words)
  return total & _MASK


def _offsets(outer, start, strides, r0, r1) -> np.ndarray:
  """Index in the whole array of the first element of rows ``r0:r1``."""
  out = np.zeros(r1 - r0, np.uint64)
  if not outer:
    return out
  for d, i in enumerate(np.unravel_index(np.arange(r0, r1), outer)):
    out += (i.astype(np.uint64) + np.uint64(start[d])) * np.uint64(strides[d])
  return out


def _words(a: np.ndarray) -> np.ndarray:
  """``(rows, cols)`` elements as ``(rows, cols * w)`` uint64 words."""
  a = np.ascontiguousarray(a)
  size = a.dtype.itemsize
  if size in (1, 2, 4):
    return a.view(f"u{size}").astype(np.uint64)
  if size % 8 == 0:
    return a.view(np.uint64)
  return a.view(np.uint8).astype(np.uint64)


def _hash_sum(z: np.ndarray, words: np.ndarray) -> int:
  """Sum of mix(z ^ words), ``z`` (the words' index times golden) reused."""
  z ^= words
  shifted = np.empty_like(z)
  for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
    np.right_shift(z, np.uint64(shift), out=shifted)
    z ^= shifted
    if factor is not None:
      z *= factor
  return int(z.sum(dtype=np.uint64))


def _local_blocks(x) -> Iterator[tuple[tuple[int, ...], Any]]:
  if isinstance(x, jax.Array):
    shards = [s for s in x.addressable_shards if s.replica_id == 0]
    for s in shards:  # start every copy to the host before hashing any
      s.data.copy_to_host_async()
    for s in shards:
      start = tuple(sl.indices(n)[0] for sl, n in zip(s.index, x.shape))
      yield start, np.asarray(s.data)
  elif jax.process_index() == 0:
    yield (0,) * np.ndim(x), np.asarray(x)


def all_processes_sum(local: list[int], failed: bool) -> tuple[bool, list[int]]:
  """Adds every process's cell sums (mod 2**64); also whether any process
  ``failed`` (so that all of them take the same branch afterwards)."""
  if jax.process_count() == 1:
    return failed, local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  values = np.array([int(failed)] + list(local), np.uint64)
  halves = np.stack([values & np.uint64(0xFFFFFFFF),
                     values >> np.uint64(32)]).astype(np.uint32)
  got = np.asarray(multihost_utils.process_allgather(halves))
  values = got[:, 0].astype(np.uint64) | (got[:, 1].astype(np.uint64)
                                          << np.uint64(32))
  total = values.sum(axis=0, dtype=np.uint64)
  return bool(values[:, 0].any()), [int(v) for v in total[1:]]


def to_hex(value: int) -> str:
  return f"{value:016x}"
