"""ZeRO's sharded flat layout: the params' leaves packed by
:class:`jadam.FlatLayout` into one buffer per dtype, split into ``N`` equal
slices over the data axis.

Model-parallel params: on a mesh with more axes than the data axis, a param
may be sharded over the other axes (its ``NamedSharding`` is kept by
``init``). Every device packs its own blocks of the params, so the state
follows the params' sharding and is further split along the data axis: a
buffer has shape ``(M, L)`` with sharding ``P(other_axes, data)``, one row of
``L`` elements per position ``M`` on the other axes.

A :class:`ZeroLayout` is static and hashable; the state's moments carry it as
:class:`jadam.Packed` auxiliary data.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _validate as V
from .._layout import FlatLayout
from .._layout import sharded_pad_multiple
from .._quant import QArray
from ._common import PyTree


def spec_axes(spec) -> set:
  """The mesh axes named in a ``PartitionSpec``."""
  out = set()
  for entry in spec or ():
    if entry is None:
      continue
    out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroLayout:
  """Static description of the sharded flat layout of one params tree.

  Attributes:
    flat: the :class:`jadam.FlatLayout` of one device's blocks of the params
      (the whole params when they are replicated), padded to a multiple of
      :func:`jadam._layout.sharded_pad_multiple`.
    specs: per leaf (flattening order, ``None`` leaves included) the
      ``PartitionSpec`` of the param over the mesh axes other than the data
      axis (``P()``: replicated), or ``None`` for a ``None`` leaf.
    global_shapes: per leaf its global shape (``None`` for a ``None`` leaf).
    axis_name: the data axis.
    num_shards: devices on the data axis.
    other_axes: the mesh's other axes, in mesh order.
    other_sizes: their sizes.
  """

  flat: FlatLayout
  specs: tuple
  global_shapes: tuple
  axis_name: str
  num_shards: int
  other_axes: tuple[str, ...]
  other_sizes: tuple[int, ...]
  _hash: int = dataclasses.field(repr=False, compare=False, default=0)

  def __post_init__(self):
    # Hashed once: the layout is part of the state's tree structure, which
    # jit hashes and compares on every call.
    object.__setattr__(self, "_hash", hash((
        self.flat, self.specs, self.global_shapes, self.axis_name, self.num_shards,
        self.other_axes, self.other_sizes)))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    if self is other:
      return True
    return (isinstance(other, ZeroLayout) and self._hash == other._hash
            and (self.flat, self.specs, self.global_shapes, self.axis_name,
                 self.num_shards, self.other_axes, self.other_sizes)
            == (other.flat, other.specs, other.global_shapes, other.axis_name,
                other.num_shards, other.other_axes, other.other_sizes))

  @property
  def keys(self) -> tuple[str, ...]:
    return self.flat.keys

  def tree_shape_dtypes(self) -> PyTree:
    """The params' tree as ``jax.ShapeDtypeStruct`` (global shapes, the
    params' dtypes; ``None`` kept): what a weight-decay mask is given."""
    return self.flat.treedef.unflatten([
        None if seg is None else jax.ShapeDtypeStruct(shape, self.flat.buffer(seg.key).dtype)
        for seg, shape in zip(self.flat.segments, self.global_shapes)])

  @property
  def num_rows(self) -> int:
    """``M``: positions on the other axes (1 on a one-axis mesh)."""
    return math.prod(self.other_sizes)

  def buffer_shape(self, key: str) -> tuple[int, ...]:
    """Global shape of a state buffer: ``(L,)``, or ``(M, L)`` with other axes."""
    length = self.flat.buffer(key).length
    return (self.num_rows, length) if self.other_axes else (length,)

  def slice_length(self, key: str) -> int:
    return self.flat.buffer(key).length // self.num_shards

  @property
  def state_spec(self) -> P:
    """Sharding of every state buffer (and of the reduced gradient slices)."""
    if self.other_axes:
      return P(self.other_axes, self.axis_name)
    return P(self.axis_name)

  def local_buffer(self, x):
    """Inside ``shard_map``: a device's block of a buffer as a 1-D slice (a
    quantized moment: its codes and scales of the slice's blocks)."""
    if isinstance(x, QArray):
      return x.map_arrays(lambda a, k: a.reshape((-1,) + a.shape[a.ndim - k + 1:]))
    return x.reshape(-1)

  def to_block(self, x):
    """Inside ``shard_map``: a 1-D slice as the device's block of a buffer."""
    if not self.other_axes:
      return x
    if isinstance(x, QArray):
      return x.map_arrays(lambda a, k: a[None])
    return x.reshape((1, -1))


@functools.lru_cache(maxsize=64)
def _make_layout(treedef, leaves, axis_name, num_shards, other_axes, other_sizes,
                 quant_block=1, small_leaf=None):
  local, specs, shapes = [], [], []
  sizes = dict(zip(other_axes, other_sizes))
  for leaf in leaves:
    if leaf is None:
      local.append(None)
      specs.append(None)
      shapes.append(None)
      continue
    shape, dtype, spec = leaf
    block = list(shape)
    for dim, entry in enumerate(spec):
      if entry is None:
        continue
      n = math.prod(sizes[a] for a in (entry if isinstance(entry, tuple) else (entry,)))
      block[dim] //= n
    local.append(jax.ShapeDtypeStruct(tuple(block), dtype))
    specs.append(spec)
    shapes.append(shape)
  # Quantized moments: every slice holds whole blocks of ``quant_block``.
  flat = FlatLayout.from_tree(
      treedef.unflatten(local),
      pad_multiple=math.lcm(sharded_pad_multiple(num_shards), quant_block * num_shards),
      small_leaf=small_leaf)
  return ZeroLayout(flat, tuple(specs), tuple(shapes), axis_name, num_shards,
                    other_axes, other_sizes)


def _param_spec(fn: str, path, x, mesh: Mesh, axis_name: str) -> P:
  """The spec a param keeps: its own ``NamedSharding``'s (over the other mesh
  axes), or replicated."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return P()
  spec = sharding.spec
  if not spec_axes(spec):
    return P()
  where = jax.tree_util.keystr(path) or "<root>"
  if (tuple(sharding.mesh.axis_names) != tuple(mesh.axis_names)
      or sharding.mesh.devices.shape != mesh.devices.shape
      or not np.array_equal(sharding.mesh.device_ids, mesh.device_ids)):
    raise ValueError(
        f"`{fn}`: the param at {where} is sharded ({spec}) over another mesh "
        f"than the trainer's {dict(mesh.shape)}; place it on the trainer's mesh")
  if axis_name in spec_axes(spec):
    raise ValueError(
        f"`{fn}`: the param at {where} is sharded over the data axis "
        f"{axis_name!r} ({spec}); ZeRO stages 1 and 2 keep params replicated "
        "over the data axis (they shard only the optimizer state)")
  shape = np.shape(x)
  for dim, entry in enumerate(spec):
    if entry is None:
      continue
    n = math.prod(mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,)))
    if shape[dim] % n:
      raise ValueError(
          f"`{fn}`: the param at {where} has shape {shape}; dimension {dim} "
          f"({shape[dim]}) must divide over {n} devices for {spec}")
  # Trailing None entries are dropped: P("model", None) and P("model") are
  # the same placement (a step may return either), so the same layout.
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def zero_layout(params: PyTree, mesh: Mesh, axis_name: str,
                fn: str = "DataParallel.init", block: int = 1,
                small_leaf: int | None = None) -> ZeroLayout:
  """The sharded flat layout of ``params`` (arrays or ``ShapeDtypeStruct``) on
  ``mesh``; a leaf's ``NamedSharding`` over the non-data axes is kept.
  Quantized moments: ``block`` is their largest block size (each device's
  slice holds whole blocks), and leaves under ``small_leaf`` elements share
  a buffer of their own (float32 moments)."""
  flat, treedef = V.flatten_with_none(params)
  leaves = []
  for path, x in flat:
    if x is None:
      leaves.append(None)
      continue
    V.check_params_leaf(fn, path, x)
    leaves.append((tuple(np.shape(x)), V.dtype_of(x),
                   _param_spec(fn, path, x, mesh, axis_name)))
  other = tuple(a for a in mesh.axis_names if a != axis_name)
  return _make_layout(treedef, tuple(leaves), axis_name, mesh.shape[axis_name],
                      other, tuple(mesh.shape[a] for a in other), int(block), small_leaf)


def replicated_zero_layout(tree: PyTree, num_shards: int, block: int = 1,
                           small_leaf: int | None = None) -> ZeroLayout:
  """The layout :func:`zero_layout` gives replicated ``tree`` (shapes and
  dtypes only) on ``num_shards`` devices of a one-axis mesh (no mesh needed)."""
  flat, treedef = V.flatten_with_none(tree)
  leaves = tuple(None if x is None else (tuple(np.shape(x)), V.dtype_of(x), P())
                 for _, x in flat)
  return _make_layout(treedef, leaves, "data", int(num_shards), (), (), int(block), small_leaf)


def unpack_host(layout: ZeroLayout, mesh: Mesh, buffers) -> PyTree:
  """A tree of host arrays with the params' global shapes from gathered
  (host) buffers of ``layout`` on ``mesh``."""
  if not layout.other_axes:
    return jax.tree.map(np.asarray, layout.flat.unpack(buffers))
  rows = [layout.flat.unpack({k: v[m] for k, v in buffers.items()})
          for m in range(layout.num_rows)]
  rows = [layout.flat.treedef.flatten_up_to(r) for r in rows]
  axis_pos = {a: mesh.axis_names.index(a) for a in layout.other_axes}
  data_pos = mesh.axis_names.index(layout.axis_name)
  out = []
  for i, (shape, spec) in enumerate(zip(layout.global_shapes, layout.specs)):
    if shape is None:
      out.append(None)
      continue
    dtype = np.asarray(rows[0][i]).dtype
    full = np.zeros(shape, dtype)
    index_map = NamedSharding(mesh, spec).devices_indices_map(shape)
    for coords in np.ndindex(*mesh.devices.shape):
      if coords[data_pos]:
        continue
      m = np.ravel_multi_index(tuple(coords[axis_pos[a]] for a in layout.other_axes),
                               layout.other_sizes) if layout.other_axes else 0
      full[index_map[mesh.devices[coords]]] = np.asarray(rows[m][i])
    out.append(full)
  return layout.flat.treedef.unflatten(out)

