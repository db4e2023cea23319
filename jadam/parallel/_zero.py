"""ZeRO stages 1 and 2: the optimizer state sharded flat over the data axis.

Plain data parallelism keeps a full copy of the Adam moments on every device
(8 bytes per float32 parameter). Here each of the ``N`` devices on the data
axis keeps ``1/N`` of them, as DeepSpeed's ZeRO and Megatron's distributed
optimizer do:

* the state lives in the *sharded flat* layout: the params' leaves packed by
  :class:`jadam.FlatLayout` into one buffer per dtype, padded so that the
  buffer splits into ``N`` equal slices, slice ``d`` on device ``d``;
* a step reduce-scatters the packed gradient (each device receives the mean
  of its slice only), applies the Adam rule of :mod:`jadam._rule` to its
  slice of params, moments and gradient, and all-gathers the updated params:
  the same bytes on the wire as one all-reduce of the gradient.

Stage 1 (``"zero1"``) and stage 2 (``"zero2"``) differ only with gradient
accumulation: stage 1 sums the micro-batch gradients in a full-size local
buffer and reduce-scatters once per step; stage 2 reduce-scatters every
micro-batch's gradient and accumulates only its ``1/N`` slice (less memory,
``accumulation_steps`` reduce-scatters per step).

Model-parallel params: on a mesh with more axes than the data axis, a param
may be sharded over the other axes (its ``NamedSharding`` is kept by
``init``). Every device packs its own blocks of the params, so the state
follows the params' sharding and is further split along the data axis: a
buffer has shape ``(M, L)`` with sharding ``P(other_axes, data)``, one row of
``L`` elements per position ``M`` on the other axes.

Gradients are taken in the global view (``jax.vmap`` of the loss over the
devices' shares, partitioned by GSPMD, so a model-parallel ``loss_fn`` needs
no collectives of its own); the exchange and the update are explicit
collectives in ``jax.shard_map``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _core
from .. import _rule
from .. import _validate as V
from .._flat import PAD_MULTIPLE
from .._flat import FlatLayout
from ._common import PyTree
from ._common import StepConfig
from ._common import Strategy
from ._common import check_batch
from ._common import mean_loss_and_grads
from ._common import put_batch_leaf
from ._common import put_params
from ._common import register_strategy
from ._common import split_local
from ._common import to_host

_STATE_CLASSES = (_core.AdamState, _core.AmsgradState)


def zero_pad_multiple(num_shards: int) -> int:
  """Every buffer's padded length is a multiple of this.

  ``lcm(1024, num_shards)``: 1024 for any power-of-two count up to 1024, so
  a state saved on 8 devices has the same buffers on 4, 2 or 1 and restores
  there unchanged.
  """
  return math.lcm(PAD_MULTIPLE, int(num_shards))


def _auto_mesh(mesh: Mesh) -> Mesh:
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _dtype_of(x) -> np.dtype:
  dtype = getattr(x, "dtype", None)
  return np.dtype(dtype if dtype is not None else np.asarray(x).dtype)


def _spec_axes(spec) -> set:
  out = set()
  for entry in spec or ():
    if entry is None:
      continue
    out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


# ---------------------------------------------------------------------------
# The sharded flat layout.


@dataclasses.dataclass(frozen=True)
class ZeroLayout:
  """Static description of the sharded flat layout of one params tree.

  Attributes:
    flat: the :class:`jadam.FlatLayout` of one device's blocks of the params
      (the whole params when they are replicated), padded to a multiple of
      :func:`zero_pad_multiple`.
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

  @property
  def keys(self) -> tuple[str, ...]:
    return self.flat.keys

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

  def local_buffer(self, x: jax.Array) -> jax.Array:
    """Inside ``shard_map``: a device's block of a buffer as a 1-D slice."""
    return x.reshape(-1)

  def to_block(self, x: jax.Array) -> jax.Array:
    """Inside ``shard_map``: a 1-D slice as the device's block of a buffer."""
    return x.reshape((1, -1)) if self.other_axes else x


@functools.lru_cache(maxsize=64)
def _make_layout(treedef, leaves, axis_name, num_shards, other_axes, other_sizes):
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
  flat = FlatLayout.from_tree(treedef.unflatten(local),
                              pad_multiple=zero_pad_multiple(num_shards))
  return ZeroLayout(flat, tuple(specs), tuple(shapes), axis_name, num_shards,
                    other_axes, other_sizes)


def _param_spec(fn: str, path, x, mesh: Mesh, axis_name: str) -> P:
  """The spec a param keeps: its own ``NamedSharding``'s (over the other mesh
  axes), or replicated."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return P()
  spec = sharding.spec
  if not _spec_axes(spec):
    return P()
  where = jax.tree_util.keystr(path) or "<root>"
  if (tuple(sharding.mesh.axis_names) != tuple(mesh.axis_names)
      or sharding.mesh.devices.shape != mesh.devices.shape
      or not np.array_equal(sharding.mesh.device_ids, mesh.device_ids)):
    raise ValueError(
        f"`{fn}`: the param at {where} is sharded ({spec}) over another mesh "
        f"than the trainer's {dict(mesh.shape)}; place it on the trainer's mesh")
  if axis_name in _spec_axes(spec):
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
  return P(*spec)


def zero_layout(params: PyTree, mesh: Mesh, axis_name: str,
                fn: str = "DataParallel.init") -> ZeroLayout:
  """The sharded flat layout of ``params`` (arrays or ``ShapeDtypeStruct``) on
  ``mesh``; a leaf's ``NamedSharding`` over the non-data axes is kept."""
  flat, treedef = V.flatten_with_none(params)
  leaves = []
  for path, x in flat:
    if x is None:
      leaves.append(None)
      continue
    V.check_params_leaf(fn, path, x)
    leaves.append((tuple(np.shape(x)), _dtype_of(x),
                   _param_spec(fn, path, x, mesh, axis_name)))
  other = tuple(a for a in mesh.axis_names if a != axis_name)
  return _make_layout(treedef, tuple(leaves), axis_name, mesh.shape[axis_name],
                      other, tuple(mesh.shape[a] for a in other))


# ---------------------------------------------------------------------------
# The two exchanges and the update, each a shard_map over the whole mesh.


def reduce_scatter_grads(layout: ZeroLayout, mesh: Mesh, grads: PyTree,
                         dtype=None) -> dict[str, jax.Array]:
  """The mean over the data axis of per-device gradients, each device keeping
  only its slice of the packed result.

  Args:
    layout: the params' sharded flat layout.
    mesh: the (Auto) mesh.
    grads: per-device gradients: each leaf ``(N, *param_shape)``, sharded
      ``P(data, *param_spec)`` (row ``d`` is device ``d``'s gradient).
    dtype: cast the reduced slices to this dtype (``None``: keep the
      gradients' own dtype per buffer).

  Returns:
    ``{dtype name: slices}``, each with the state buffers' shape and sharding.
  """
  axis, n = layout.axis_name, layout.num_shards
  grad_specs = jax.tree.map(lambda s: P(axis, *s), list(layout.specs),
                            is_leaf=lambda s: isinstance(s, P))
  grad_specs = layout.flat.treedef.unflatten(grad_specs)

  def per_device(local):
    local = jax.tree.map(lambda g: g[0], local)
    packed = layout.flat.pack(local, dtype="promote")
    out = {}
    for k, buf in packed.items():
      s = jax.lax.psum_scatter(buf, axis, scatter_dimension=0, tiled=True)
      s = s / jnp.asarray(n, s.dtype)
      out[k] = layout.to_block(s if dtype is None else s.astype(dtype))
    return out

  # check_vma=False: nothing here is differentiated, and the buffers mix
  # leaves sharded over the other axes with replicated ones.
  return jax.shard_map(
      per_device, mesh=mesh, in_specs=(grad_specs,),
      out_specs={k: layout.state_spec for k in layout.keys},
      check_vma=False)(grads)


class _SegmentData(NamedTuple):
  ends: np.ndarray  # end offset of each leaf of the buffer, in buffer order
  decay: np.ndarray | None  # per segment (+ padding): weight decay applies
  sharded_over: dict  # other axis -> per segment: the leaf is sharded over it


def _segment_data(layout: ZeroLayout, key: str, decay_mask) -> _SegmentData:
  b = layout.flat.buffer(key)
  ends = np.array([layout.flat.segments[i].offset + layout.flat.segments[i].size
                   for i in b.leaves], np.int64)
  decay = None
  if decay_mask is not None:
    decay = np.array([decay_mask[i] for i in b.leaves] + [False])
  sharded_over = {}
  for a in layout.other_axes:
    flags = np.array([a in _spec_axes(layout.specs[i]) for i in b.leaves] + [False])
    if flags.any():
      sharded_over[a] = flags
  return _SegmentData(ends, decay, sharded_over)


def _segment_ids(ends: np.ndarray, start, length: int) -> jax.Array:
  """Per element of the slice ``[start, start + length)`` of a buffer: the
  index of its leaf among the buffer's leaves (padding: one past the last).

  A binary search over the few leaf boundaries, in-graph: no buffer-sized
  constant (a slice's position is only known on its device).
  """
  idx = start + jax.lax.iota(jnp.int32, length)
  if ends.size == 0:
    return jnp.zeros((length,), jnp.int32)
  return jnp.searchsorted(jnp.asarray(ends, jnp.int32), idx, side="right",
                          method="scan").astype(jnp.int32)


def sharded_update(
    spec: _core.OptimizerSpec,
    layout: ZeroLayout,
    mesh: Mesh,
    decay_mask: tuple[bool, ...] | None,
    grad_slices: dict[str, jax.Array],
    state,
    params: PyTree,
):
  """One optimizer step on every device's slice, then the all-gather of the
  updated params.

  Args:
    spec: the optimizer (rule and hyperparameters).
    layout: the params' sharded flat layout.
    mesh: the (Auto) mesh.
    decay_mask: per-leaf booleans (flattening order): where weight decay
      applies; ``None``: everywhere.
    grad_slices: the reduced gradient, from :func:`reduce_scatter_grads`.
    state: ``AdamState``/``AmsgradState`` with sharded flat moments.
    params: the params (replicated over the data axis).

  Returns:
    ``(params, state)`` after the step, in the same layout.
  """
  rule = spec.rule
  axis = layout.axis_name
  use_wd = spec.uses_weight_decay()
  scale_lr = spec.learning_rate is not None
  segments = {k: _segment_data(layout, k, decay_mask if use_wd else None)
              for k in layout.keys}
  param_specs = layout.flat.treedef.unflatten(list(layout.specs))
  buffer_specs = {k: layout.state_spec for k in layout.keys}
  state_specs = _core.state_class(rule)(
      P(), *(buffer_specs for _ in rule.moment_names))

  def per_device(g_slices, state, params):
    d = jax.lax.axis_index(axis)
    count_inc = _rule.safe_increment(state.count)
    hp = spec.hyper(state.count)
    scalars = _rule.step_scalars(rule, hp, count_inc)
    p_packed = layout.flat.pack(params)
    new_p, new_moments = {}, {name: {} for name in rule.moment_names}
    for b in layout.flat.buffers:
      k, length = b.key, layout.slice_length(b.key)
      start = d * length
      p = jax.lax.dynamic_slice_in_dim(p_packed[k], start, length)
      g = layout.local_buffer(g_slices[k])
      moments = tuple(layout.local_buffer(getattr(state, n)[k])
                      for n in rule.moment_names)
      direction, moms = _rule.element_update(rule, hp, scalars, g, moments)
      pc = p.astype(direction.dtype)
      seg = segments[k]
      ids = None
      if (use_wd and seg.decay is not None and not seg.decay[:-1].all()) or rule.trust_ratio:
        ids = _segment_ids(seg.ends, start, length)
      if use_wd and _core._nonzero(hp.weight_decay):  # pylint: disable=protected-access
        decayed = direction + hp.weight_decay * pc
        if seg.decay is None or seg.decay[:-1].all():
          direction = decayed
        elif seg.decay.any():
          direction = jnp.where(jnp.asarray(seg.decay)[ids], decayed, direction)
      if rule.trust_ratio:
        direction = direction * _trust_ratio(layout, seg, ids, pc, direction)
      u = direction
      if scale_lr:
        u = jnp.asarray(-hp.learning_rate, dtype=direction.dtype) * direction
      # As optax.apply_updates after an update in the params' dtype.
      u = u.astype(b.dtype)
      p_next = (p + u).astype(b.dtype)
      new_p[k] = jax.lax.all_gather(p_next, axis, tiled=True)
      for name, m in zip(rule.moment_names, moms):
        new_moments[name][k] = layout.to_block(m)
    params = layout.flat.unpack(new_p)
    state = _core.state_class(rule)(
        count_inc, *(new_moments[n] for n in rule.moment_names))
    return params, state

  return jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(buffer_specs, state_specs, param_specs),
      out_specs=(param_specs, state_specs),
      check_vma=False)(grad_slices, state, params)


def _trust_ratio(layout: ZeroLayout, seg: _SegmentData, ids, p, direction):
  """LAMB's per-parameter ``|p| / |u|`` on a slice: per-leaf partial sums of
  squares, summed over the data axis (and over the other axes for leaves
  sharded over them)."""
  num = seg.ends.size + 1

  def sq(x):
    return x * x if jnp.isrealobj(x) else (x * jnp.conj(x)).real

  sums = jnp.stack([
      jax.ops.segment_sum(sq(p), ids, num, indices_are_sorted=True),
      jax.ops.segment_sum(sq(direction), ids, num, indices_are_sorted=True),
  ])
  sums = jax.lax.psum(sums, layout.axis_name)
  for a, flags in seg.sharded_over.items():
    sums = jnp.where(jnp.asarray(flags), jax.lax.psum(sums, a), sums)
  norms = jnp.sqrt(sums)
  return _rule.trust_ratio(norms[0], norms[1])[ids]


# ---------------------------------------------------------------------------
# The strategies.


class _ZeroStep:
  """The compiled step for whatever params layout it is called with."""

  def __init__(self, strategy: "ZeroStrategy"):
    self._strategy = strategy
    self._jitted: dict[ZeroLayout, Any] = {}

  def _fn(self, params):
    layout = self._strategy.layout_for(params, "DataParallel.step(params)")
    fn = self._jitted.get(layout)
    if fn is None:
      fn = jax.jit(functools.partial(self._strategy.step_body, layout),
                   donate_argnums=(0, 1))
      self._jitted[layout] = fn
    return layout, fn

  def __call__(self, params, opt_state, batch):
    layout, fn = self._fn(params)
    self._strategy.check_state(layout, opt_state)
    return fn(params, opt_state, batch)

  def lower(self, params, opt_state, batch):
    layout, fn = self._fn(params)
    self._strategy.check_state(layout, opt_state)
    return fn.lower(params, opt_state, batch)


class ZeroStrategy(Strategy):
  """ZeRO data parallelism: params replicated over the data axis, optimizer
  state (stage 1) and reduced gradients (stage 2) sharded flat over it.

  Needs a jadam optimizer (``jadam.adam``, ``adamw``, ``amsgrad``,
  ``adamax(w)``, ``nadam(w)``, ``radam``, ``lamb``; not inside an
  ``optax.chain``): the step applies its rule to each device's slice.
  """

  stage: int = 0

  def __init__(self, config: StepConfig):
    super().__init__(config)
    name = f"zero{self.stage}"
    from .._optimizers import optimizer_spec  # pylint: disable=import-outside-toplevel

    self.spec = optimizer_spec(config.optimizer)
    if self.spec is None:
      raise ValueError(
          f"`DataParallel(strategy={name!r})` needs a jadam optimizer "
          "(jadam.adam, jadam.adamw, jadam.amsgrad, jadam.lamb, ...) whose "
          "rule it applies to each device's slice of the state; got "
          f"{config.optimizer!r} (for other optax transformations use "
          "strategy='shard_map', 'jit' or 'pmap')")
    self.mesh = _auto_mesh(config.mesh)
    self._layout: ZeroLayout | None = None

  # -- layout

  def context_mesh(self) -> Mesh:
    return self.mesh

  def layout_for(self, params, fn: str = "DataParallel.init") -> ZeroLayout:
    layout = zero_layout(params, self.mesh, self.config.axis_name, fn)
    self._layout = layout
    return layout

  @property
  def layout(self) -> ZeroLayout | None:
    """The layout of the params last seen by ``init`` or ``step``."""
    return self._layout

  def _decay_mask(self, layout: ZeroLayout):
    if self.spec.mask is None or not self.spec.uses_weight_decay():
      return None
    return tuple(V.resolve_mask(self.spec.name, self.spec.mask,
                                layout.flat.treedef.unflatten(list(
                                    jax.ShapeDtypeStruct(s, np.float32) if s is not None
                                    else None for s in layout.global_shapes))))

  def param_sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def state_shape_dtypes(self, layout: ZeroLayout):
    """The optimizer state as ``ShapeDtypeStruct`` with shardings."""
    rule = self.spec.rule
    sharding = NamedSharding(self.mesh, layout.state_spec)
    moments = []
    for name in rule.moment_names:
      want = self.spec.mu_dtype if name == "mu" else self.spec.nu_dtype
      moments.append({
          b.key: jax.ShapeDtypeStruct(layout.buffer_shape(b.key),
                                      np.dtype(want or b.dtype), sharding=sharding)
          for b in layout.flat.buffers})
    count = jax.ShapeDtypeStruct((), np.int32,
                                 sharding=NamedSharding(self.mesh, P()))
    return _core.state_class(rule)(count, *moments)

  def abstract_state(self, params):
    """``(params, opt_state)`` as ``init`` would make them, as
    ``jax.ShapeDtypeStruct`` with shardings (nothing is allocated)."""
    layout = self.layout_for(params)
    flat, treedef = V.flatten_with_none(params)
    leaves = [None if x is None else jax.ShapeDtypeStruct(
        np.shape(x), _dtype_of(x), sharding=self.param_sharding(s))
              for (_, x), s in zip(flat, layout.specs)]
    return treedef.unflatten(leaves), self.state_shape_dtypes(layout)

  def check_state(self, layout: ZeroLayout, opt_state) -> None:
    rule = self.spec.rule
    cls = _core.state_class(rule)
    want = self.state_shape_dtypes(layout)
    ok = isinstance(opt_state, cls)
    if ok:
      for name in rule.moment_names:
        got, exp = getattr(opt_state, name), getattr(want, name)
        if not isinstance(got, dict) or set(got) != set(exp) or any(
            np.shape(got[k]) != exp[k].shape for k in exp):
          ok = False
    if not ok:
      raise ValueError(
          f"`DataParallel.step(opt_state=...)` must be the zero{self.stage} "
          f"state of these params (from trainer.init or a previous step): a "
          f"{cls.__name__} with flat buffers "
          f"{ {k: v.shape for k, v in want.mu.items()} }; got "
          f"{jax.tree.map(np.shape, opt_state)}")

  # -- Strategy

  def init(self, params):
    layout = self.layout_for(params)
    flat, treedef = V.flatten_with_none(params)
    placed = []
    for (_, x), s in zip(flat, layout.specs):
      if x is None:
        placed.append(None)
      elif s == P():
        placed.append(put_params(x, self.param_sharding(P())))
      else:
        placed.append(put_params(x, self.param_sharding(s)))
    params = treedef.unflatten(placed)
    want = self.state_shape_dtypes(layout)
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(
          lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), want),
          out_shardings=jax.tree.map(lambda s: s.sharding, want))()
    return params, opt_state

  def place_batch(self, batch):
    check_batch(self.config, batch)
    sharding = NamedSharding(self.mesh, P(self.config.axis_name))
    return jax.tree.map(lambda x: put_batch_leaf(x, sharding), batch)

  def gather(self, tree):
    def leaf(x):
      if isinstance(x, _STATE_CLASSES) and isinstance(x.mu, dict):
        return self._gather_state(x)
      return jax.tree.map(to_host, x)

    return jax.tree.map(leaf, tree,
                        is_leaf=lambda x: isinstance(x, _STATE_CLASSES))

  def _gather_state(self, state):
    layout = self._layout
    if layout is None:
      raise ValueError("`DataParallel.gather`: call init (or step) first, so "
                       "the trainer knows the params' layout")
    rule = self.spec.rule
    moments = [self._unpack_host(layout, {k: to_host(v) for k, v in
                                          getattr(state, n).items()})
               for n in rule.moment_names]
    return type(state)(to_host(state.count), *moments)

  def _unpack_host(self, layout: ZeroLayout, buffers: dict[str, np.ndarray]):
    """A tree of host arrays with the params' global shapes from gathered
    buffers."""
    if not layout.other_axes:
      return jax.tree.map(np.asarray, layout.flat.unpack(buffers))
    rows = [layout.flat.unpack({k: v[m] for k, v in buffers.items()})
            for m in range(layout.num_rows)]
    rows = [layout.flat.treedef.flatten_up_to(r) for r in rows]
    axis_pos = {a: self.mesh.axis_names.index(a) for a in layout.other_axes}
    data_pos = self.mesh.axis_names.index(layout.axis_name)
    out = []
    for i, (shape, spec) in enumerate(zip(layout.global_shapes, layout.specs)):
      if shape is None:
        out.append(None)
        continue
      dtype = np.asarray(rows[0][i]).dtype
      full = np.zeros(shape, dtype)
      index_map = NamedSharding(self.mesh, spec).devices_indices_map(shape)
      for coords in np.ndindex(*self.mesh.devices.shape):
        if coords[data_pos]:
          continue
        m = np.ravel_multi_index(tuple(coords[axis_pos[a]] for a in layout.other_axes),
                                 layout.other_sizes) if layout.other_axes else 0
        full[index_map[self.mesh.devices[coords]]] = np.asarray(rows[m][i])
      out.append(full)
    return layout.flat.treedef.unflatten(out)

  def build_step(self):
    return _ZeroStep(self)

  # -- the step

  def local_grads(self, config: StepConfig, layout: ZeroLayout, params, batch):
    """Each device's mean loss, aux and gradient over its share of ``batch``
    (leaves ``(N, share, ...)``), in the global view: a ``vmap`` over the
    devices that GSPMD keeps on each device."""
    axis = config.axis_name
    k = config.accumulation_steps
    split = split_local(k)
    loss, aux, grads = jax.vmap(
        lambda b: mean_loss_and_grads(config, params, b, split))(batch)
    flat_grads, treedef = V.flatten_with_none(grads)
    grads = treedef.unflatten([
        None if g is None else jax.lax.with_sharding_constraint(
            g, NamedSharding(self.mesh, P(axis, *s)))
        for (_, g), s in zip(flat_grads, layout.specs)])
    return loss, aux, grads

  def split_batch(self, batch, k: int = 1):
    """``(B, ...)`` -> ``(N, B // N, ...)``, or ``(k, N, B // (N k), ...)``,
    each device keeping its own rows."""
    n, axis = self.config.num_shards, self.config.axis_name

    def split(x):
      share = x.shape[0] // n
      x = x.reshape((n, share) + x.shape[1:])
      if k == 1:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, P(axis)))
      x = x.reshape((n, k, share // k) + x.shape[2:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(self.mesh, P(None, axis)))

    return jax.tree.map(split, batch)

  def reduced_grads(self, layout: ZeroLayout, params, batch):
    """``(loss, aux, grad_slices)``: the mean loss and aux over the batch and
    each device's slice of the mean gradient (stage 1: one reduce-scatter of
    the accumulated gradient)."""
    loss, aux, grads = self.local_grads(self.config, layout, params,
                                        self.split_batch(batch))
    slices = reduce_scatter_grads(layout, self.mesh, grads)
    loss, aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), (loss, aux))
    return loss, aux, slices

  def step_body(self, layout: ZeroLayout, params, opt_state, batch):
    loss, aux, slices = self.reduced_grads(layout, params, batch)
    params, opt_state = sharded_update(
        self.spec, layout, self.mesh, self._decay_mask(layout), slices,
        opt_state, params)
    return params, opt_state, loss, aux


@register_strategy("zero1")
class Zero1Strategy(ZeroStrategy):
  """ZeRO stage 1: optimizer state sharded flat over the data axis; the
  gradient, accumulated over micro-batches in a full-size local buffer, is
  reduce-scattered once per step."""

  stage = 1


@register_strategy("zero2")
class Zero2Strategy(ZeroStrategy):
  """ZeRO stage 2: as stage 1, and every micro-batch's gradient is
  reduce-scattered at once, so the accumulated gradient is kept only as each
  device's ``1/N`` slice (``accumulation_steps`` reduce-scatters per step)."""

  stage = 2

  def reduced_grads(self, layout, params, batch):
    k = self.config.accumulation_steps
    if k == 1:
      return super().reduced_grads(layout, params, batch)
    config = dataclasses.replace(self.config, accumulation_steps=1)
    micro = self.split_batch(batch, k)

    def one(acc, micro_batch):
      loss, aux, grads = self.local_grads(config, layout, params, micro_batch)
      slices = reduce_scatter_grads(layout, self.mesh, grads)
      acc = jax.tree.map(lambda a, s: a + s.astype(a.dtype), acc, slices)
      # Per-device values: averaged once after the loop, not once per
      # micro-batch (each mean over devices is an all-reduce).
      return acc, (loss, aux)

    sharding = NamedSharding(self.mesh, layout.state_spec)
    acc = {b.key: jax.lax.with_sharding_constraint(
        jnp.zeros(layout.buffer_shape(b.key),
                  jnp.promote_types(b.dtype, jnp.float32)), sharding)
           for b in layout.flat.buffers}
    acc, (losses, auxes) = jax.lax.scan(one, acc, micro)
    slices = {b.key: (acc[b.key] / k).astype(b.dtype) for b in layout.flat.buffers}
    loss, aux = jax.tree.map(lambda x: jnp.mean(x, axis=(0, 1)), (losses, auxes))
    return loss, aux, slices
