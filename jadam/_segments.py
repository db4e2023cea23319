"""Which parameter each element of a chunk belongs to: norms, broadcasts, masks.

The update path (:mod:`jadam._update`) applies the rule to *chunks*: a tree
leaf, a packed buffer or one device's slice of one. Per-parameter work (LAMB's
norms, a weight-decay mask) needs to know the parameters inside a chunk; a
layout says so with a *segments* object:

* ``norms(xs)`` — per segment, the 2-norm of each array in ``xs``;
* ``expand(v)`` — per-segment values broadcast to the chunk's elements;
* ``select(flags)`` — static per-segment booleans as ``True``/``False`` (all
  the same) or a per-element boolean array.

:data:`WHOLE` (a tree leaf: one parameter) and :class:`BufferSegments` (a
packed buffer: its leaves, then the padding) live here; ZeRO's slices of a
buffer add a cross-device sum (``jadam.parallel``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ._layout import FlatLayout
from ._sharding import replicated_if_explicit

_WORD = 32  # bits per mask word: static per-element masks are packed 32 to a uint32.


def sq(x: jax.Array) -> jax.Array:
  """``|x|^2`` elementwise, real for complex ``x``."""
  return x * x if jnp.isrealobj(x) else (x * jnp.conj(x)).real


class _Whole:
  """A chunk that is one whole parameter (a tree leaf): optax's own norms."""

  def norms(self, xs):
    return tuple(optax.safe_norm(x, 0.0) for x in xs)

  def expand(self, values):
    return values

  def select(self, flags):
    return bool(flags[0])


WHOLE = _Whole()


# ------------------------------------------------- static per-element data, in-graph
#
# Per-element static data (a weight-decay mask, LAMB's segment ids) must not be
# embedded as a buffer-sized constant: XLA inlines constants into the program
# (a 100M-element mask is 100 MB of HLO, seconds of compile) and constant-folds
# whatever is computed from them. Both are rebuilt inside the fused pass from
# one 32-bit word (and one base id) per 32 elements, by broadcasting, shifts and
# popcounts: no gather over the buffer, no cumulative sum, 1/16 of the bytes.
# A length that is not a multiple of 32 is handled as the next multiple (the
# last segment extended), sliced back at the end.


def _rows(length: int) -> int:
  return -(-length // _WORD)


def _bit_words(bits: np.ndarray) -> np.ndarray:
  """Packs a bool array into uint32 words (zero-extended to a multiple of 32),
  bit j = element j."""
  bits = np.pad(bits, (0, _rows(bits.size) * _WORD - bits.size))
  return np.packbits(bits.reshape(-1, _WORD), axis=1, bitorder="little").view("<u4")[:, 0]


def _unpack_bits(words: np.ndarray, *, upto: bool = False) -> jax.Array:
  """(rows, 32) uint32 view of static words: ``(w >> j) & 1``, or with ``upto``
  ``w & (bits 0..j)`` — the in-graph expansion of :func:`_bit_words`."""
  j = lax.broadcasted_iota(jnp.uint32, (words.shape[0], _WORD), 1)
  w = jnp.asarray(words)[:, None]
  if upto:
    ones = jnp.uint32(0xFFFFFFFF)
    return w & (ones >> (jnp.uint32(_WORD - 1) - j))
  return (w >> j) & jnp.uint32(1)


def mask_elements(bits: np.ndarray) -> Any:
  """A static per-element bool mask as a (traced) buffer, or a Python bool if uniform."""
  if bits.all():
    return True
  if not bits.any():
    return False
  rows = _unpack_bits(_bit_words(bits)).astype(bool).reshape(-1)
  return rows if rows.size == bits.size else rows[:bits.size]


class SegmentTable(NamedTuple):
  """Static data for the segment reductions of one buffer (see :func:`segment_norms`).

  Segments here are the buffer's non-empty leaves, then the padding (if
  any), numbered 0, 1, ... in buffer order, so ids rise by 0 or 1 per element.
  """

  num: int  # number of segments
  length: int  # elements of the buffer
  base: np.ndarray  # (rows,) id of each 32-element row's first element
  words: np.ndarray  # (rows,) bit j set where a segment starts at row element j > 0
  mixed_rows: np.ndarray  # rows where a segment starts after element 0
  mixed_ids: np.ndarray  # (len(mixed_rows), 32) their per-element ids
  mixed_first: np.ndarray  # (len(mixed_rows), 32) element is in the row's first segment


def segment_table(sizes: tuple[int, ...]) -> SegmentTable:
  """The table of a buffer made of segments of these sizes (zero sizes dropped)."""
  return _segment_table(tuple(int(s) for s in sizes if s))


@functools.lru_cache(maxsize=64)
def _segment_table(sizes: tuple[int, ...]) -> SegmentTable:
  length = sum(sizes)
  ids = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
  # Extend the last segment to whole rows; those elements are sliced off.
  ids = np.pad(ids, (0, _rows(length) * _WORD - length), mode="edge")
  rows = ids.reshape(-1, _WORD)
  starts = np.zeros_like(rows, dtype=bool)
  starts[:, 1:] = rows[:, 1:] != rows[:, :-1]
  mixed = np.flatnonzero(starts.any(axis=1))
  return SegmentTable(
      len(sizes), length, np.ascontiguousarray(rows[:, 0]), _bit_words(starts.reshape(-1)),
      mixed, rows[mixed], rows[mixed] == rows[mixed, :1],
  )


def _within(table: SegmentTable) -> jax.Array:
  """(rows, 32): per element, how many segments start in its row up to it."""
  return lax.population_count(_unpack_bits(table.words, upto=True)).astype(jnp.int32)


def segment_ids(table: SegmentTable) -> jax.Array:
  """The ``int32`` segment id of every element of the buffer, built in-graph."""
  ids = (jnp.asarray(table.base)[:, None] + _within(table)).reshape(-1)
  return ids if ids.size == table.length else ids[:table.length]


def segment_norms(table: SegmentTable, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """Per-segment 2-norms of each buffer in ``xs``: a tuple of ``(table.num,)`` arrays.

  A segment's sum of squares is the sum, over its 32-element rows, of the row
  sums of its elements (a vectorized reduction), added up by a scatter over
  rows (``segment_sum``, 1/32 of the elements); the few rows where a segment
  starts mid-row add their later segments' elements separately. Sums of
  squares are in the buffers' dtype (float32 or wider), like the tree form's
  norms, but in a different order: they agree to float32 rounding, not bit
  for bit.
  """
  rows = table.base.shape[0]
  extra = rows * _WORD - table.length
  first = _within(table) == 0
  norms = []
  for x in xs:
    s2 = sq(x)
    if extra:
      s2 = jnp.pad(s2, (0, extra))
    s2 = s2.reshape(rows, _WORD)
    row_sums = jnp.sum(jnp.where(first, s2, jnp.zeros((), s2.dtype)), axis=1)
    total = jax.ops.segment_sum(row_sums, table.base, table.num, indices_are_sorted=True)
    if table.mixed_rows.size:
      rest = jnp.where(table.mixed_first, jnp.zeros((), s2.dtype), s2[table.mixed_rows])
      total = total + jax.ops.segment_sum(
          rest.reshape(-1), table.mixed_ids.reshape(-1), table.num, indices_are_sorted=True
      )
    norms.append(jnp.sqrt(total))
  return tuple(norms)


class BufferSegments:
  """The segments of one packed buffer of a :class:`FlatLayout`: its leaves in
  buffer order, then the padding (never decayed, never in a norm)."""

  def __init__(self, layout: FlatLayout, key: str):
    self.buffer = layout.buffer(key)
    self.sizes = layout.segment_sizes(key)

  @functools.cached_property
  def table(self) -> SegmentTable:
    # Built only for per-leaf norms (LAMB): its static arrays are buffer-sized
    # numpy work at trace time, which plain Adam never needs.
    return segment_table(self.sizes)  # empty leaves have no segment here

  def norms(self, xs):
    # A buffer split over an Explicit mesh is gathered for its per-leaf sums.
    xs = tuple(replicated_if_explicit(x) for x in xs)
    if len(self.buffer.leaves) == 1:  # one parameter: plain norms
      return tuple(jnp.linalg.norm(x[:self.buffer.size]) for x in xs)
    return segment_norms(self.table, xs)

  def expand(self, values):
    if len(self.buffer.leaves) == 1:
      return values
    return values[segment_ids(self.table)]

  def select(self, flags):
    if all(flags):  # the padding is zero: decaying it too changes nothing
      return True
    flags = tuple(flags) + (False,)
    return mask_elements(np.repeat(np.array(flags, bool), self.sizes))
