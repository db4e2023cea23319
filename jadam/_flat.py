"""The flat layout: every dtype's leaves packed in one padded 1-D buffer.

A pytree of many small arrays costs kernels (and microseconds) per leaf per
step, and a compiled step grows with the number of leaves. Packed, the same
Adam step is one fused elementwise pass per buffer; kept packed end to end
(params, gradients and state), its compile time no longer depends on the
number of leaves.

* :class:`FlatLayout` — the static, hashable description of the packing
  (per dtype: offsets, shapes, padding) with ``pack`` and ``unpack``.
* :func:`flat_transformation` — the ``layout="flat"`` form of every jadam
  optimizer: tree grads in, tree updates out, moments kept packed.

The math is :mod:`jadam._rule`'s, called once per buffer. LAMB's
per-parameter norms are segment reductions over the buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from . import _core
from . import _rule
from . import _validate as V

PAD_MULTIPLE = 8 * 128
"""Default padded-length multiple of a buffer: 1024 = 8 x 128 elements.

It divides evenly by every power-of-two device count up to 1024 (a buffer
shards with ``NamedSharding`` over 1, 2, 4, 8, ... devices, and a checkpoint
made on 8 restores onto 4), each shard is a whole number of 128-lane tiles,
and it is a multiple of 32, which the fused pass uses for bit-packed masks.
"""

MAX_PACKED_LEAF = 1 << 15
"""Leaves larger than this (32768 elements) keep a buffer of their own in the
``layout="flat"`` optimizers' state (tree in, tree out). Packing a leaf costs a
copy in and a copy out per step (16 bytes per float32 param, and on CPU fresh
pages for the temporary buffers); that pays only while the leaf is small
enough that its own kernels' fixed cost (microseconds each) dominates."""

_WORD = 32  # bits per mask word: static per-element masks are packed 32 to a uint32.


class Segment(NamedTuple):
  """Where one leaf lives in its buffer."""

  key: str  # its buffer's key
  offset: int  # first element in the buffer
  shape: tuple[int, ...]
  size: int  # number of elements (0 for a zero-size leaf)


class Buffer(NamedTuple):
  """One packed buffer: all leaves of one dtype, in tree order, zero padded."""

  key: str  # the key in the packed dict: the dtype's name, or "<dtype>.leaf<i>"
  dtype: np.dtype
  size: int  # elements used by leaves
  length: int  # padded length: a multiple of the layout's pad_multiple
  leaves: tuple[int, ...]  # indices (in flattening order) of its leaves


def _dtype_of(leaf) -> np.dtype:
  dt = getattr(leaf, "dtype", None)
  return np.dtype(dt) if dt is not None else np.dtype(jnp.asarray(leaf).dtype)


def _key(dtype: np.dtype) -> str:
  return np.dtype(dtype).name


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
  """Static description of how a pytree packs into one buffer per dtype.

  Leaves of the same dtype are raveled and concatenated in tree-flattening
  order, then zero padded to a multiple of ``pad_multiple`` elements. The
  packed value is a ``dict`` from buffer key — the dtype's name
  (``"float32"``, ``"bfloat16"``, ...) — to a 1-D buffer, so it is itself a
  pytree: it jits, donates, shards (with ``jax.sharding.NamedSharding`` over
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
                max_packed_leaf: int | None = None) -> FlatLayout:
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

    Returns:
      The layout. Equal trees (structure, shapes, dtypes) and arguments give
      the same (cached) layout object.
    """
    for name, value, allow_none in (("pad_multiple", pad_multiple, False),
                                    ("max_packed_leaf", max_packed_leaf, True)):
      if value is None and allow_none:
        continue
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
          1 if name == "pad_multiple" else 0):
        raise ValueError(
            f"`FlatLayout.from_tree({name}=...)` must be a "
            f"{'positive' if name == 'pad_multiple' else 'non-negative'} integer"
            f"{' or None' if allow_none else ''}, got {value!r}"
        )
    flat, treedef = V.flatten_with_none(tree)
    specs = tuple(
        None if leaf is None else (tuple(np.shape(leaf)), _dtype_of(leaf))
        for _, leaf in flat
    )
    return _layout_from_specs(
        treedef, specs, int(pad_multiple), None if max_packed_leaf is None else int(max_packed_leaf)
    )

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

  def shape_dtypes(self, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
    """The packed value's shapes and dtypes (e.g. for ``jax.jit(out_shardings=...)``).

    Args:
      sharding: optional sharding given to every buffer.
    """
    return {b.key: jax.ShapeDtypeStruct((b.length,), b.dtype, sharding=sharding)
            for b in self.buffers}

  def tree_shape_dtypes(self):
    """The unpacked tree as ``jax.ShapeDtypeStruct`` leaves (``None`` kept)."""
    return self.treedef.unflatten([
        None if s is None else jax.ShapeDtypeStruct(s.shape, self.buffer(s.key).dtype)
        for s in self.segments
    ])

  # ----------------------------------------------------------- pack/unpack

  def _leaves(self, fn: str, tree) -> list:
    flat, treedef = V.flatten_with_none(tree)
    if treedef != self.treedef:
      V.check_same_structure(fn, tree, "the layout's tree", self.tree_shape_dtypes())
      raise ValueError(
          f"`{fn}` must have the layout's tree structure {self.treedef}, got {treedef}"
      )
    leaves = []
    for (path, leaf), seg in zip(flat, self.segments):
      if (leaf is None) != (seg is None):
        raise ValueError(
            f"`{fn}` differs from the layout at "
            f"{jax.tree_util.keystr(path) or '<root>'}: one holds None, the other "
            f"{'an array' if leaf is None else 'None'}"
        )
      if leaf is not None and tuple(np.shape(leaf)) != seg.shape:
        raise ValueError(
            f"`{fn}` differs from the layout at {jax.tree_util.keystr(path) or '<root>'}: "
            f"shape {tuple(np.shape(leaf))} versus {seg.shape}"
        )
      leaves.append(leaf)
    return leaves

  def pack(self, tree, *, dtype=None) -> dict[str, jax.Array]:
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
      ``{buffer key: buffer}`` with buffers of shape ``(buffer.length,)``.
    """
    leaves = self._leaves("FlatLayout.pack(tree)", tree)
    out = {}
    for b in self.buffers:
      parts = [jnp.ravel(leaves[i]) for i in b.leaves]
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
    return out

  def unpack(self, packed):
    """The tree of a packed value: each leaf a reshaped static slice of its buffer.

    Args:
      packed: ``{buffer key: buffer}`` as made by :meth:`pack` (or any
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
      pieces = lax.split(_replicated_if_explicit(packed[b.key]), sizes)
      for i, piece in zip(b.leaves, pieces):
        leaves[i] = piece.reshape(self.segments[i].shape)
    return self.treedef.unflatten(leaves)

  def check_packed(self, name: str, packed) -> None:
    """Raises a ValueError unless ``packed`` has this layout's buffers."""
    if not isinstance(packed, dict) or set(packed) != set(self.keys):
      got = sorted(packed) if isinstance(packed, dict) else type(packed).__name__
      raise ValueError(
          f"`{name}` must be a dict of packed buffers with keys {list(self.keys)} "
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

  def segment_ids(self, key: str) -> np.ndarray:
    """Per element of buffer ``key``: the index of its leaf among the buffer's leaves.

    Padding elements get ``len(buffer.leaves)``, one past the last leaf, so
    ``jax.ops.segment_sum(x, ids, num_segments=len(buffer.leaves) + 1)`` gives
    one sum per leaf plus the padding's (zero) sum.

    Returns:
      A static int32 numpy array of shape ``(buffer.length,)``.
    """
    b = self.buffer(key)
    sizes = [self.segments[i].size for i in b.leaves] + [b.length - b.size]
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
    out = {}
    for b in self.buffers:
      m = np.zeros(b.length, bool)
      for i in b.leaves:
        s = self.segments[i]
        m[s.offset:s.offset + s.size] = flags[i]
      out[b.key] = m
    return out

  def _leaf_flags(self, fn: str, mask) -> tuple[bool, ...]:
    if isinstance(mask, (list, tuple)) and len(mask) == self.num_leaves and all(
        isinstance(m, (bool, np.bool_)) for m in mask):
      return tuple(bool(m) for m in mask)
    return tuple(V.resolve_mask(fn, mask, self.tree_shape_dtypes()))


def _replicated_if_explicit(x):
  """``x`` resharded to replicated if its type carries an explicit sharding.

  With ``Explicit`` mesh axes, slicing a sharded buffer into leaves of other
  shapes has no sharding JAX can infer; a replicated buffer slices freely.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or all(axis is None for axis in spec):
    return x
  return jax.sharding.reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))


@functools.lru_cache(maxsize=256)
def _layout_from_specs(treedef, specs, pad_multiple, max_packed_leaf) -> FlatLayout:
  groups: dict[str, list[int]] = {}
  dtypes: dict[str, np.dtype] = {}
  for i, spec in enumerate(specs):
    if spec is None:
      continue
    k = _key(spec[1])
    if max_packed_leaf is not None and math.prod(spec[0]) > max_packed_leaf:
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
  return FlatLayout(treedef, tuple(segments), tuple(buffers), pad_multiple)


# ------------------------------------------------- static per-element data, in-graph
#
# Per-element static data (a weight-decay mask, LAMB's segment ids) must not be
# embedded as a buffer-sized constant: XLA inlines constants into the program
# (a 100M-element mask is 100 MB of HLO, seconds of compile) and constant-folds
# whatever is computed from them. Both are rebuilt inside the fused pass from
# one 32-bit word (and one base id) per 32 elements, by broadcasting, shifts and
# popcounts: no gather over the buffer, no cumulative sum, 1/16 of the bytes.


def _bit_words(bits: np.ndarray) -> np.ndarray:
  """Packs a bool array (length a multiple of 32) into uint32 words, bit j = element j."""
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


def _mask_elements(bits: np.ndarray) -> Any:
  """A static per-element bool mask as a (traced) buffer, or a Python bool if uniform."""
  if bits.all():
    return True
  if not bits.any():
    return False
  if bits.size % _WORD:
    return jnp.asarray(bits)
  return _unpack_bits(_bit_words(bits)).astype(bool).reshape(bits.size)


class _SegmentTable(NamedTuple):
  """Static data for the segment reductions of one buffer (see :func:`_segment_norms`).

  Segments here are the buffer's non-empty leaves, then the padding (if
  any), numbered 0, 1, ... in buffer order, so ids rise by 0 or 1 per element.
  """

  num: int  # number of segments
  ids: np.ndarray | None  # per-element ids, only when length % 32 != 0
  base: np.ndarray | None  # (rows,) id of each 32-element row's first element
  words: np.ndarray | None  # (rows,) bit j set where a segment starts at row element j > 0
  mixed_rows: np.ndarray | None  # rows where a segment starts after element 0
  mixed_ids: np.ndarray | None  # (len(mixed_rows), 32) their per-element ids
  mixed_first: np.ndarray | None  # (len(mixed_rows), 32) element is in the row's first segment


@functools.lru_cache(maxsize=64)
def _segment_table(layout: FlatLayout, key: str) -> _SegmentTable:
  b = layout.buffer(key)
  sizes = [layout.segments[i].size for i in b.leaves] + [b.length - b.size]
  sizes = [s for s in sizes if s]
  ids = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
  if b.length % _WORD:
    return _SegmentTable(len(sizes), ids, None, None, None, None, None)
  rows = ids.reshape(-1, _WORD)
  starts = np.zeros_like(rows, dtype=bool)
  starts[:, 1:] = rows[:, 1:] != rows[:, :-1]
  mixed = np.flatnonzero(starts.any(axis=1))
  return _SegmentTable(
      len(sizes), None, np.ascontiguousarray(rows[:, 0]), _bit_words(starts), mixed,
      rows[mixed], rows[mixed] == rows[mixed, :1],
  )


def _segment_norms(table: _SegmentTable, xs: tuple[jax.Array, ...]):
  """Per-segment 2-norms of each buffer in ``xs``, and the element -> segment ids.

  A segment's sum of squares is the sum, over its 32-element rows, of the row
  sums of its elements (a vectorized reduction), added up by a scatter over
  rows (``segment_sum``, 1/32 of the elements); the few rows where a segment
  starts mid-row add their later segments' elements separately. Sums of
  squares are in the buffers' dtype (float32 or wider), like the tree form's
  ``jnp.linalg.norm``, but in a different order: they agree to float32
  rounding, not bit for bit.

  Returns:
    ``(norms, ids)``: a tuple of ``(table.num,)`` arrays, and the ``int32``
    segment id of every element (a flat buffer).
  """
  def sq(x):
    return x * x if jnp.isrealobj(x) else (x * jnp.conj(x)).real

  if table.ids is not None:  # buffer length not a multiple of 32: plain segment sums
    norms = tuple(
        jnp.sqrt(jax.ops.segment_sum(sq(x), table.ids, table.num, indices_are_sorted=True))
        for x in xs
    )
    return norms, jnp.asarray(table.ids)
  rows = table.base.shape[0]
  within = lax.population_count(_unpack_bits(table.words, upto=True)).astype(jnp.int32)
  ids = (jnp.asarray(table.base)[:, None] + within).reshape(rows * _WORD)
  first = within == 0
  norms = []
  for x in xs:
    s2 = sq(x).reshape(rows, _WORD)
    row_sums = jnp.sum(jnp.where(first, s2, jnp.zeros((), s2.dtype)), axis=1)
    total = jax.ops.segment_sum(row_sums, table.base, table.num, indices_are_sorted=True)
    if table.mixed_rows.size:
      rest = jnp.where(table.mixed_first, jnp.zeros((), s2.dtype), s2[table.mixed_rows])
      total = total + jax.ops.segment_sum(
          rest.reshape(-1), table.mixed_ids.reshape(-1), table.num, indices_are_sorted=True
      )
    norms.append(jnp.sqrt(total))
  return tuple(norms), ids


# ------------------------------------------------------------ the flat step


def _check_flat_state(fn: str, rule: _rule.Rule, layout: FlatLayout, state) -> None:
  _core._check_state(fn, rule, state)  # pylint: disable=protected-access
  for name in rule.moment_names:
    moment = getattr(state, name)
    if not isinstance(moment, dict) or set(moment) != set(layout.keys) or any(
        tuple(np.shape(moment[b.key])) != (b.length,) for b in layout.buffers):
      got = (f"a dict with keys {sorted(moment, key=str)}" if isinstance(moment, dict)
             else type(moment).__name__)
      if isinstance(moment, dict) and set(moment) == set(layout.keys):
        got = f"buffers of shapes { {k: tuple(np.shape(v)) for k, v in moment.items()} }"
      raise ValueError(
          f"`{fn}(state=...)` does not match the params' flat layout: `state.{name}` "
          f"must be packed buffers {{{', '.join(f'{b.key!r}: ({b.length},)' for b in layout.buffers)}}}, "
          f"got {got}. Was the state made by this optimizer's init (layout='flat') "
          f"for these params?"
      )


def flat_update(
    fn: str,
    rule: _rule.Rule,
    hp: _rule.Hyper,
    layout: FlatLayout,
    grads,
    state,
    params=None,
    *,
    decay_mask: tuple[bool, ...] | None = None,
    scale_lr: bool = True,
):
  """One step with packed moments: tree ``grads``/``params`` in, tree updates out.

  Args:
    fn: the public function's name, for error messages.
    rule: the static rule.
    hp: hyperparameter values at this step.
    layout: the params' :class:`FlatLayout`.
    grads: gradients, a tree with the layout's structure and shapes.
    state: ``AdamState``/``AmsgradState`` with packed moments.
    params: current params (a tree; needed for weight decay and LAMB).
    decay_mask: per-leaf booleans (flattening order): where weight decay
      applies. ``None``: everywhere.
    scale_lr: multiply by ``-learning_rate`` (False for ``scale_by_adam``).

  Returns:
    ``(updates, new_state)``: updates as a tree, the state still packed.
  """
  _check_flat_state(fn, rule, layout, state)
  use_wd = _core._nonzero(hp.weight_decay)  # pylint: disable=protected-access
  if params is None and (rule.trust_ratio or use_wd):
    raise ValueError(
        f"`{fn}` needs `params` (for weight decay or LAMB's trust ratio); got params=None"
    )
  if params is not None:
    V.check_same_structure("params", params, "grads", grads)
  if decay_mask is not None and all(decay_mask):
    decay_mask = None
  static_hp, dynamic_hp = _core._split_hyper(hp)  # pylint: disable=protected-access
  return _flat_update_jit(
      rule, static_hp, layout, decay_mask, use_wd, scale_lr, dynamic_hp, grads, state, params,
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), inline=True)
def _flat_update_jit(rule, static_hp, layout, decay_mask, use_wd, scale_lr,
                     dynamic_hp, grads, state, params):
  # Static Python-float hyperparameters stay compile-time constants, exactly
  # as in the tree layout, so both layouts run the same float32 operations.
  hp = static_hp._replace(**{k: v for k, v in dynamic_hp._asdict().items()
                             if static_hp._asdict()[k] == _core._DYNAMIC})  # pylint: disable=protected-access
  count_inc = _rule.safe_increment(state.count)
  scalars = _rule.step_scalars(rule, hp, count_inc)
  g_packed = layout.pack(grads, dtype="promote")
  # Params are read only for weight decay and the trust ratio: plain Adam never
  # packs them (one fewer copy of every leaf per step).
  needs_params = params is not None and (use_wd or rule.trust_ratio)
  p_packed = layout.pack(params) if needs_params else None
  decay_bits = layout.mask_buffers(decay_mask) if decay_mask is not None else None

  out, new_moments = {}, {name: {} for name in rule.moment_names}
  for b in layout.buffers:
    k = b.key
    direction, moms = _rule.element_update(
        rule, hp, scalars, g_packed[k], tuple(getattr(state, n)[k] for n in rule.moment_names)
    )
    p = p_packed[k].astype(direction.dtype) if p_packed is not None else None
    if use_wd:
      mask = True if decay_bits is None else _mask_elements(decay_bits[k])
      if mask is True:
        direction = direction + hp.weight_decay * p
      elif mask is not False:
        direction = jnp.where(mask, direction + hp.weight_decay * p, direction)
    if rule.trust_ratio and len(b.leaves) == 1:  # one parameter: plain norms
      direction = direction * _rule.trust_ratio(
          jnp.linalg.norm(p[:b.size]), jnp.linalg.norm(direction[:b.size]))
    elif rule.trust_ratio:
      (p_norm, u_norm), ids = _segment_norms(_segment_table(layout, k), (p, direction))
      direction = direction * _rule.trust_ratio(p_norm, u_norm)[ids]
    u = direction
    if scale_lr:
      u = jnp.asarray(-hp.learning_rate, dtype=direction.dtype) * direction
    out[k] = u.astype(b.dtype if params is not None else g_packed[k].dtype)
    for name, m in zip(rule.moment_names, moms):
      new_moments[name][k] = m

  updates = layout.unpack(out)
  if params is None:  # the tree form returns updates in the gradients' dtypes
    updates = jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), updates, grads)
  new_state = _core.state_class(rule)(count_inc, *(new_moments[n] for n in rule.moment_names))
  return updates, new_state


def init_flat_state(fn: str, rule: _rule.Rule, layout: FlatLayout, mu_dtype=None,
                    nu_dtype=None):
  """Zero packed moments for ``layout`` (count 0)."""
  moments = {name: {} for name in rule.moment_names}
  for b in layout.buffers:
    dts = {"mu": mu_dtype or b.dtype, "nu": nu_dtype or b.dtype, "nu_max": nu_dtype or b.dtype}
    for name in rule.moment_names:
      moments[name][b.key] = jnp.zeros((b.length,), dts[name])
  del fn
  return _core.state_class(rule)(
      jnp.zeros([], jnp.int32), *(moments[n] for n in rule.moment_names)
  )


def flat_transformation(spec: _core.OptimizerSpec) -> optax.GradientTransformationExtraArgs:
  """The ``layout="flat"`` form of the optimizer ``spec``.

  ``init(params)`` packs nothing but the moments: the state is the tree
  form's class (``AdamState``/``AmsgradState``) whose moments are packed
  ``{buffer key: buffer}`` dicts for
  ``FlatLayout.from_tree(params, max_packed_leaf=MAX_PACKED_LEAF)``: all
  leaves of up to 32768 elements of one dtype share a buffer; larger leaves
  have one each (see :data:`MAX_PACKED_LEAF`).
  ``update(grads, state, params)`` takes and returns trees (so it chains with
  optax and applies with ``optax.apply_updates``): it packs the gradients
  (and params, for weight decay or LAMB), runs one fused pass per buffer and
  unpacks the updates. The layout is rebuilt from the params' (else the
  gradients') structure at each call — static, so free under ``jit``.
  """
  fn = spec.name
  use_wd = spec.uses_weight_decay()
  # Layouts made by init, by tree structure: update(params=None) with gradients
  # in another dtype than the params still finds the params' layout.
  layouts: dict[Any, FlatLayout] = {}

  def init_fn(params):
    for path, leaf in V.flatten_with_none(params)[0]:
      if leaf is not None:
        V.check_params_leaf(fn, path, leaf)
    if spec.mask is not None:
      V.resolve_mask(fn, spec.mask, params)  # structure errors at init, not mid-training
    layout = FlatLayout.from_tree(params, max_packed_leaf=MAX_PACKED_LEAF)
    layouts[layout.treedef] = layout
    return init_flat_state(fn, spec.rule, layout, spec.mu_dtype, spec.nu_dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is not None:
      layout = FlatLayout.from_tree(params, max_packed_leaf=MAX_PACKED_LEAF)
    else:
      treedef = V.flatten_with_none(updates)[1]
      layout = layouts.get(treedef) or FlatLayout.from_tree(
          updates, max_packed_leaf=MAX_PACKED_LEAF)
    decay_mask = None
    if use_wd and spec.mask is not None and params is not None:
      decay_mask = tuple(V.resolve_mask(fn, spec.mask, params))
    return flat_update(
        fn, spec.rule, spec.hyper(state.count), layout, updates, state, params,
        decay_mask=decay_mask, scale_lr=spec.learning_rate is not None,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
