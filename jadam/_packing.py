"""Where the leaves of a :class:`jadam.FlatLayout` go: segments, buffers, padding.

The static arithmetic of packing, without arrays: which buffer holds each
leaf and at which offset, and how long each padded buffer is.
:mod:`jadam._layout` builds its layouts from :func:`plan`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

PAD_MULTIPLE = 8 * 128
"""Default padded-length multiple of a buffer: 1024 = 8 x 128 elements.

It divides evenly by every power-of-two device count up to 1024 (a buffer
shards with ``NamedSharding`` over 1, 2, 4, 8, ... devices, and a checkpoint
made on 8 restores onto 4), each shard is a whole number of 128-lane tiles,
and it is a multiple of 32, which the fused pass uses for bit-packed masks.
"""


def sharded_pad_multiple(num_shards: int) -> int:
  """Padded-length multiple of a buffer split into ``num_shards`` equal slices.

  ``lcm(1024, num_shards)``: 1024 for any power-of-two count up to 1024, so
  a state saved on 8 devices has the same buffers on 4, 2 or 1 and restores
  there unchanged.
  """
  return math.lcm(PAD_MULTIPLE, int(num_shards))


class Segment(NamedTuple):
  """Where one leaf lives in its buffer."""

  key: str  # its buffer's key
  offset: int  # first element in the buffer
  shape: tuple[int, ...]
  size: int  # number of elements (0 for a zero-size leaf)


class Buffer(NamedTuple):
  """One packed buffer: all leaves of one dtype, in tree order, zero padded."""

  key: str  # the key in the packed value: the dtype's name, or "<dtype>.leaf<i>"
  dtype: np.dtype
  size: int  # elements used by leaves
  length: int  # padded length: a multiple of the layout's pad_multiple
  leaves: tuple[int, ...]  # indices (in flattening order) of its leaves


def _key(dtype: np.dtype) -> str:
  return np.dtype(dtype).name


def check_options(pad_multiple, max_packed_leaf, small_leaf) -> None:
  """Raises a ValueError naming the first bad argument of
  ``FlatLayout.from_tree``."""
  for name, value, allow_none in (("pad_multiple", pad_multiple, False),
                                  ("max_packed_leaf", max_packed_leaf, True),
                                  ("small_leaf", small_leaf, True)):
    if value is None and allow_none:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
        1 if name == "pad_multiple" else 0):
      raise ValueError(
          f"`FlatLayout.from_tree({name}=...)` must be a "
          f"{'positive' if name == 'pad_multiple' else 'non-negative'} integer"
          f"{' or None' if allow_none else ''}, got {value!r}"
      )


def plan(specs, pad_multiple: int, max_packed_leaf: int | None,
         small_leaf: int | None) -> tuple[tuple[Segment | None, ...], tuple[Buffer, ...]]:
  """Where each leaf goes: ``(segments, buffers)`` of a layout.

  ``specs``: per leaf in flattening order, ``(shape, dtype)`` or None. Leaves
  of one dtype share its buffer (key: the dtype's name), in order, except
  leaves below ``small_leaf`` elements (a ``"<dtype>.small"`` buffer) and
  above ``max_packed_leaf`` (a ``"<dtype>.leaf<i>"`` buffer each). Each
  buffer is zero padded to a positive multiple of ``pad_multiple``; buffers
  are sorted by key.
  """
  groups: dict[str, list[int]] = {}
  dtypes: dict[str, np.dtype] = {}
  for i, spec in enumerate(specs):
    if spec is None:
      continue
    k = _key(spec[1])
    size = math.prod(spec[0])
    if small_leaf is not None and size < small_leaf:
      k = f"{k}.small"
    elif max_packed_leaf is not None and size > max_packed_leaf:
      k = f"{k}.leaf{i}"
    groups.setdefault(k, []).append(i)
    dtypes[k] = np.dtype(spec[1])
  segments: list[Segment | None] = [None] * len(specs)
  buffers = []
  for k in sorted(groups):
    offset = 0
    for i in groups[k]:
      shape = specs[i][0]
      size = math.prod(shape)
      segments[i] = Segment(k, offset, shape, size)
      offset += size
    length = max(pad_multiple, -(-offset // pad_multiple) * pad_multiple)
    buffers.append(Buffer(k, dtypes[k], offset, length, tuple(groups[k])))
  return tuple(segments), tuple(buffers)
