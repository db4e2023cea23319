"""Static layouts of packed values: :class:`FlatLayout` and :class:`Packed`.

A pytree of many small arrays costs kernels (and microseconds) per leaf per
step, and a compiled step grows with the number of leaves. Packed (every
dtype's leaves raveled into one padded 1-D buffer), the same Adam step is one
fused elementwise pass per buffer.

* :class:`FlatLayout` — the static, hashable description of the packing (per
  dtype: offsets, shapes, padding) with ``pack`` and ``unpack``.
* :class:`Packed` — packed buffers together with the layout they were packed
  with. It is a pytree whose only children are the buffers; the layout is its
  static auxiliary data, so it travels through ``jit``, ``grad``, optimizer
  states and checkpoints without any cache or "last seen" layout.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _packing
from . import _validate as V
from ._packed import Packed
# The packing's static arithmetic (re-exported: the layouts' users import them here).
from ._packing import PAD_MULTIPLE as PAD_MULTIPLE
from ._packing import Buffer as Buffer
from ._packing import Segment as Segment
from ._packing import sharded_pad_multiple as sharded_pad_multiple
from ._sharding import replicated_if_explicit


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
  """Static description of how a pytree packs into one buffer per dtype.

  Leaves of the same dtype are raveled and concatenated in tree-flattening
  order, then zero padded to a multiple of ``pad_multiple`` elements. The
  packed value is a :class:`Packed` mapping from buffer key — the dtype's
  name (``"float32"``, ``"bfloat16"``, ...) — to a 1-D buffer that carries
  the layout statically; it is a pytree: it jits, donates, shards (with ``jax.sharding.NamedSharding`` over
  the buffer's only axis) and checkpoints like any other. ``None`` leaves are
  kept (as ``None``) and take no space. A layout is hashable: use it as a
  ``jit`` static argument or close over it.

  With ``max_packed_leaf``, leaves above that size get a buffer each (key
  ``"<dtype>.leaf<i>"``); the ``layout="flat"`` optimizers' state uses this.

  Padding elements stay exactly zero through Adam: their gradient is zero
  (the loss never reads them), so their moments and updates are zero too.

  Attributes:
    treedef: the tree structure, ``None`` leaves included.
    segments: per leaf in flattening order, its :class:`Segment` (``None``
      for a ``None`` leaf).
    buffers: the :class:`Buffer` s, sorted by key (the order of the packed
      dict's leaves).
    pad_multiple: every buffer's length is a multiple of it.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "s": None}
    >>> layout = jadam.FlatLayout.from_tree(params)
    >>> packed = layout.pack(params)
    >>> {k: v.shape for k, v in packed.items()}
    {'float32': (1024,)}
    >>> def loss(packed):
    ...   p = layout.unpack(packed)
    ...   return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"])
    >>> grads = jax.grad(loss)(packed)  # packed too
    >>> state = jadam.init(packed)
    >>> packed, state = jax.jit(jadam.step)(grads, state, packed)
    >>> layout.unpack(packed)["w"].shape
    (3, 4)
  """

  treedef: Any
  segments: tuple[Segment | None, ...]
  buffers: tuple[Buffer, ...]
  pad_multiple: int
  _hash: int = dataclasses.field(repr=False, compare=False, default=0)

  # ----------------------------------------------------------- construction

  @classmethod
  def from_tree(cls, tree, *, pad_multiple: int = PAD_MULTIPLE,
                max_packed_leaf: int | None = None,
                small_leaf: int | None = None) -> FlatLayout:
    """The layout of ``tree``.

    Args:
      tree: a pytree of arrays, ``jax.ShapeDtypeStruct`` or anything with a
        shape and dtype (only shapes and dtypes are read; tracers are fine).
        ``None`` leaves are kept.
      pad_multiple: each buffer is zero padded to a multiple of this many
        elements (default 1024 = 8 x 128; see :data:`PAD_MULTIPLE`). Use a
        multiple of the device count when sharding the buffers.
      max_packed_leaf: ``None`` (default): one buffer per dtype. An integer:
        leaves with more elements than this get a buffer of their own (key
        ``"<dtype>.leaf<i>"``, ``i`` the leaf's flattening index), the others
        share their dtype's buffer. The ``layout="flat"`` optimizers use
        this: on CPU, copying a large leaf in and out of a shared buffer
        costs more than its own kernel does.
      small_leaf: ``None`` (default), or an integer: leaves with fewer
        elements share a buffer of their own per dtype (key
        ``"<dtype>.small"``). Quantized moments use this: small leaves keep
        float32 moments, the other buffers are quantized.

    Returns:
      The layout. Equal trees (structure, shapes, dtypes) and arguments give
      the same (cached) layout object.
    """
    _packing.check_options(pad_multiple, max_packed_leaf, small_leaf)
    flat, treedef = V.flatten_with_none(tree)
    specs = tuple(
        None if leaf is None else (tuple(np.shape(leaf)), V.dtype_of(leaf))
        for _, leaf in flat
    )
    return _layout_from_specs(
        treedef, specs, int(pad_multiple),
        None if max_packed_leaf is None else int(max_packed_leaf),
        None if small_leaf is None else int(small_leaf))

  def __post_init__(self):
    object.__setattr__(
        self, "_hash",
        hash((self.treedef, self.segments, self.buffers, self.pad_multiple)),
    )

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    if self is other:
      return True
    if not isinstance(other, FlatLayout) or self._hash != other._hash:
      return False
    return (self.treedef == other.treedef and self.segments == other.segments
            and self.buffers == other.buffers and self.pad_multiple == other.pad_multiple)

  def __repr__(self) -> str:
    bufs = ", ".join(
        f"{b.key}: {len(b.leaves)} leaves, {b.size} elements padded to {b.length}"
        for b in self.buffers
    )
    return f"FlatLayout({bufs or 'empty'})"

  # ------------------------------------------------------------- properties

  @property
  def keys(self) -> tuple[str, ...]:
    """The packed dict's keys (buffer keys: dtype names), in order."""
    return tuple(b.key for b in self.buffers)

  @property
  def num_leaves(self) -> int:
    """Number of leaves, ``None`` leaves included."""
    return len(self.segments)

  @property
  def size(self) -> int:
    """Total number of elements of the leaves (padding excluded)."""
    return sum(b.size for b in self.buffers)

  def buffer(self, key: str) -> Buffer:
    """The :class:`Buffer` named ``key``."""
    for b in self.buffers:
      if b.key == key:
        return b
    raise KeyError(f"FlatLayout has no buffer {key!r}; its buffers are {self.keys}")

  def shape_dtypes(self, sharding=None) -> Packed:
    """The packed value's shapes and dtypes (e.g. for ``jax.jit(out_shardings=...)``).

    Args:
      sharding: optional sharding given to every buffer.

    Returns:
      A :class:`Packed` of ``jax.ShapeDtypeStruct`` buffers.
    """
    return Packed(self, {b.key: jax.ShapeDtypeStruct((b.length,), b.dtype, sharding=sharding)
                         for b in self.buffers})

  def tree_shape_dtypes(self):
    """The unpacked tree as ``jax.ShapeDtypeStruct`` leaves (``None`` kept)."""
    return self.treedef.unflatten([
        None if s is None else jax.ShapeDtypeStruct(s.shape, self.buffer(s.key).dtype)
        for s in self.segments
    ])

  # ----------------------------------------------------------- pack/unpack

  def _leaves(self, fn: str, tree, against: str = "the layout") -> list:
    flat, treedef = V.flatten_with_none(tree)
    if treedef != self.treedef:
      V.check_same_structure(fn, tree, f"{against}'s tree", self.tree_shape_dtypes())
      raise ValueError(
          f"`{fn}` must have the layout's tree structure {self.treedef}, got {treedef}"
      )
    leaves = []
    for (path, leaf), seg in zip(flat, self.segments):
      if (leaf is None) != (seg is None):
        raise ValueError(
            f"`{fn}` differs from {against} at "
            f"{jax.tree_util.keystr(path) or '<root>'}: one holds None, the other "
            f"{'an array' if leaf is None else 'None'}"
        )
      if leaf is not None and tuple(np.shape(leaf)) != seg.shape:
        raise ValueError(
            f"`{fn}` differs from {against} at {jax.tree_util.keystr(path) or '<root>'}: "
            f"shape {tuple(np.shape(leaf))} versus {seg.shape}"
        )
      leaves.append(leaf)
    return leaves

  def leaves_by_index(self, tree) -> list | None:
    """``tree``'s leaves by this layout's leaf index (``None`` leaves kept;
    ``tree`` has the layout's structure, unchecked), or None for no tree."""
    return None if tree is None else [x for _, x in V.flatten_with_none(tree)[0]]

  def for_tree(self, name: str, tree, against: str = "the layout") -> FlatLayout:
    """This layout for ``tree``: itself, or — when ``tree`` has the same
    leaves (shapes, in order) under other container nodes, such as Flax's
    ``nnx.Variable`` wrappers around the params that made the layout — the
    same packing with ``tree``'s structure. Raises like :meth:`check_tree`."""
    flat, treedef = V.flatten_with_none(tree)
    if treedef == self.treedef:
      return self
    if len(flat) == len(self.segments) and all(
        (leaf is None) == (seg is None) and (leaf is None or tuple(np.shape(leaf)) == seg.shape)
        for (_, leaf), seg in zip(flat, self.segments)):
      return _with_treedef(self, treedef)
    self.check_tree(name, tree, against)
    return self

  def check_tree(self, name: str, tree, against: str = "the layout") -> None:
    """Raises a ValueError naming the first difference (structure, ``None``
    leaves, shapes) between ``tree`` (called ``name``) and the layout's tree
    (called ``against``)."""
    self._leaves(name, tree, against)

  def pack(self, tree, *, dtype=None) -> Packed:
    """Packs ``tree`` into zero-padded 1-D buffers (one per dtype by default).

    Works eagerly and under ``jit``/``grad``/sharding (it is a
    ``jnp.concatenate`` of the raveled leaves and the zero padding).
    Padding elements are exactly zero.

    Args:
      tree: a pytree with the layout's structure and shapes.
      dtype: the buffers' dtype: ``None`` (default) casts each leaf to its
        buffer's dtype (the layout's); ``"promote"`` keeps every leaf's
        precision (each buffer takes the promoted dtype of its leaves, e.g.
        float32 gradients of bfloat16 params stay float32).

    Returns:
      A :class:`Packed` ``{buffer key: buffer}`` with buffers of shape
      ``(buffer.length,)``, carrying this layout.
    """
    leaves = self._leaves("FlatLayout.pack(tree)", tree)
    out = {}
    for b in self.buffers:
      # A leaf with an explicit sharding (Explicit mesh axes) is gathered first:
      # raveling it into another shape has no sharding JAX can infer.
      parts = [jnp.ravel(replicated_if_explicit(leaves[i])) for i in b.leaves]
      if dtype == "promote":
        dt = jnp.result_type(*parts) if parts else b.dtype
      elif dtype is None:
        dt = b.dtype
      else:
        raise ValueError(
            f"`FlatLayout.pack(dtype=...)` must be None or 'promote', got {dtype!r}"
        )
      parts = [x.astype(dt) for x in parts if x.size]
      if len(parts) == 1:
        # A pad (not a concatenate) fuses into its consumers: a large leaf of
        # its own buffer is never copied on its way into the update.
        out[b.key] = jnp.pad(parts[0], (0, b.length - b.size))
        continue
      if b.length > b.size or not parts:
        parts.append(jnp.zeros((b.length - b.size,), dt))
      out[b.key] = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return Packed(self, out)

  def unpack(self, packed):
    """The tree of a packed value: each leaf a reshaped static slice of its buffer.

    Args:
      packed: a :class:`Packed` (or a ``{buffer key: buffer}`` dict) as made
        by :meth:`pack` (or any
        buffers of the same lengths, e.g. packed moments or updates; leaves
        keep the buffers' dtypes).

    Returns:
      A pytree with the layout's structure and shapes (``None`` leaves kept).
      Under a mesh with ``Explicit`` axes, a sharded buffer is gathered
      first, so the leaves are replicated; otherwise (``Auto`` axes, GSPMD)
      the compiler picks their shardings.
    """
    self.check_packed("FlatLayout.unpack(packed)", packed)
    leaves = [None] * len(self.segments)
    for b in self.buffers:
      # One split (not a slice per leaf): its transpose is one concatenate, so
      # the gradient of a loss of the unpacked leaves is packed in one copy
      # instead of a buffer-sized pad-and-add per leaf.
      sizes = [self.segments[i].size for i in b.leaves] + [b.length - b.size]
      pieces = lax.split(replicated_if_explicit(packed[b.key]), sizes)
      for i, piece in zip(b.leaves, pieces):
        leaves[i] = piece.reshape(self.segments[i].shape)
    return self.treedef.unflatten(leaves)

  def check_packed(self, name: str, packed) -> None:
    """Raises a ValueError unless ``packed`` has this layout's buffers."""
    if not isinstance(packed, collections.abc.Mapping) or set(packed) != set(self.keys):
      got = (sorted(packed) if isinstance(packed, collections.abc.Mapping)
             else type(packed).__name__)
      raise ValueError(
          f"`{name}` must be packed buffers (a Packed or dict) with keys {list(self.keys)} "
          f"(from FlatLayout.pack, or a layout='flat' optimizer's state), got {got}"
      )
    for b in self.buffers:
      shape = tuple(np.shape(packed[b.key]))
      if shape != (b.length,):
        raise ValueError(
            f"`{name}[{b.key!r}]` must have shape ({b.length},) for this layout, "
            f"got {shape}"
        )

  # ---------------------------------------------------- static per-element data

  def segment_sizes(self, key: str) -> tuple[int, ...]:
    """Elements of each leaf of buffer ``key`` (buffer order), then of its padding."""
    b = self.buffer(key)
    return tuple(self.segments[i].size for i in b.leaves) + (b.length - b.size,)

  def segment_ids(self, key: str) -> np.ndarray:
    """Per element of buffer ``key``: the index of its leaf among the buffer's leaves.

    Padding elements get ``len(buffer.leaves)``, one past the last leaf, so
    ``jax.ops.segment_sum(x, ids, num_segments=len(buffer.leaves) + 1)`` gives
    one sum per leaf plus the padding's (zero) sum.

    Returns:
      A static int32 numpy array of shape ``(buffer.length,)``.
    """
    sizes = self.segment_sizes(key)
    return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)

  def mask_buffers(self, mask) -> dict[str, np.ndarray]:
    """Per-element boolean buffers from a per-leaf mask (e.g. weight decay's).

    Args:
      mask: a tree of bools with the layout's structure (or a prefix of
        it), or a sequence of one bool per leaf in flattening order.

    Returns:
      ``{buffer key: bool numpy array}``; padding elements are False.
    """
    flags = self._leaf_flags("FlatLayout.mask_buffers", mask)
    return {b.key: np.repeat(np.array([flags[i] for i in b.leaves] + [False], bool),
                             self.segment_sizes(b.key))
            for b in self.buffers}

  def _leaf_flags(self, fn: str, mask) -> tuple[bool, ...]:
    if isinstance(mask, (list, tuple)) and len(mask) == self.num_leaves and all(
        isinstance(m, (bool, np.bool_)) for m in mask):
      return tuple(bool(m) for m in mask)
    return tuple(V.resolve_mask(fn, mask, self.tree_shape_dtypes()))


@functools.lru_cache(maxsize=64)
def _with_treedef(layout: FlatLayout, treedef) -> FlatLayout:
  return FlatLayout(treedef, layout.segments, layout.buffers, layout.pad_multiple)


@functools.lru_cache(maxsize=256)
def _layout_from_specs(treedef, specs, pad_multiple, max_packed_leaf,
                       small_leaf=None) -> FlatLayout:
  return FlatLayout(treedef, *_packing.plan(specs, pad_multiple, max_packed_leaf, small_leaf),
                    pad_multiple)
