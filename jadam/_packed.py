"""Packed buffers that carry their static layout (a pytree node)."""

from __future__ import annotations

import collections.abc

import jax


@jax.tree_util.register_pytree_with_keys_class
class Packed(collections.abc.Mapping):
  """Packed buffers and the static layout they were packed with.

  A read-only mapping ``{buffer key: buffer}`` (``packed["float32"]``,
  ``packed.items()``) and a pytree: its children are the buffers (with
  dict-style key paths, so checkpoints and ``keystr`` read ``['float32']``),
  and its layout is static auxiliary data. ``jit``, ``grad``, ``tree.map``,
  donation and checkpoint restores (into a ``Packed`` target) keep the layout,
  so code that receives a packed value never has to remember or rebuild its
  layout: ``packed.layout.unpack(packed)``.

  Attributes:
    layout: the layout (a :class:`FlatLayout`, or another static layout with
      a ``keys`` tuple, such as ZeRO's sharded one).
  """

  __slots__ = ("layout", "_buffers")

  def __init__(self, layout, buffers):
    keys = tuple(layout.keys)
    if set(buffers) != set(keys):
      raise ValueError(
          f"`Packed(buffers=...)` must have the layout's keys {list(keys)}, "
          f"got {sorted(buffers)}")
    self.layout = layout
    self._buffers = {k: buffers[k] for k in keys}

  def __getitem__(self, key):
    return self._buffers[key]

  def __iter__(self):
    return iter(self._buffers)

  def __len__(self) -> int:
    return len(self._buffers)

  def __repr__(self) -> str:
    inner = ", ".join(f"{k!r}: {getattr(v, 'shape', v)}" for k, v in self._buffers.items())
    return f"Packed({{{inner}}}, layout={self.layout!r})"

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.DictKey(k), v) for k, v in self._buffers.items()], self.layout

  def tree_flatten(self):
    return list(self._buffers.values()), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    obj = object.__new__(cls)
    obj.layout = layout
    obj._buffers = dict(zip(layout.keys, children))
    return obj
