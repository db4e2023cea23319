"""ZeRO's exchange and update: the reduce-scatter of the gradient, the one
update path (:mod:`jadam._update`) on every device's slice, and the
all-gather of the updated params, each a ``shard_map`` over the whole mesh.

A step reduce-scatters the packed gradient (each device receives the mean of
its slice only), applies the rule to its slice of params, moments and
gradient, and all-gathers the updated params: the same bytes on the wire as
one all-reduce of the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .. import _core
from .. import _kernel
from .. import _segments
from .. import _update
from .._packed import Packed
from ._common import PyTree
from ._zero_layout import ZeroLayout
from ._zero_layout import spec_axes


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


class SliceSegments:
  """The segments (leaves, then padding) of device ``d``'s slice of a
  buffer: per-element ids by a binary search over the leaves' ends, and
  per-segment sums added up over the data axis (and over the other axes for
  leaves sharded over them) with ``psum``.

  The leaves' ends are kept relative to each slice (a static ``(N, leaves)``
  table clipped to ``[0, L]``), so no index ever exceeds one slice's length:
  a buffer of more than 2**31 elements needs no 64-bit integers.
  """

  def __init__(self, layout: ZeroLayout, key: str, d: jax.Array):
    flat = layout.flat
    b = flat.buffer(key)
    self.layout = layout
    self.num = len(b.leaves) + 1
    length = layout.slice_length(key)
    ends = np.array([flat.segments[i].offset + flat.segments[i].size for i in b.leaves],
                    np.int64)
    starts = np.arange(layout.num_shards, dtype=np.int64)[:, None] * length
    local_ends = np.clip(ends[None, :] - starts, 0, length).astype(np.int32)
    if ends.size:
      self.ids = jnp.searchsorted(jnp.asarray(local_ends)[d], jax.lax.iota(jnp.int32, length),
                                  side="right", method="scan").astype(jnp.int32)
    else:
      self.ids = jnp.zeros((length,), jnp.int32)
    self.sharded_over = {}
    for a in layout.other_axes:
      flags = np.array([a in spec_axes(layout.specs[i]) for i in b.leaves] + [False])
      if flags.any():
        self.sharded_over[a] = flags

  def norms(self, xs):
    sums = jnp.stack([jax.ops.segment_sum(_segments.sq(x), self.ids, self.num,
                                          indices_are_sorted=True) for x in xs])
    sums = jax.lax.psum(sums, self.layout.axis_name)
    for a, flags in self.sharded_over.items():
      sums = jnp.where(jnp.asarray(flags), jax.lax.psum(sums, a), sums)
    return tuple(jnp.sqrt(sums))

  def expand(self, values):
    return values[self.ids]

  def select(self, flags):
    if all(flags):  # the padding is zero: decaying it too changes nothing
      return True
    if not any(flags):
      return False
    return jnp.asarray(np.array(tuple(flags) + (False,)))[self.ids]


def param_slices(layout: ZeroLayout, mesh: Mesh, params: PyTree) -> Packed:
  """Every device's slice of its packed params (no communication: the params
  are replicated over the data axis), as global buffers sharded like the state."""
  n = layout.num_shards
  param_specs = layout.flat.treedef.unflatten(list(layout.specs))

  def per_device(params):
    d = jax.lax.axis_index(layout.axis_name)
    packed = layout.flat.pack(params)
    # Row d of an (N, L) view: no index beyond one slice, however long the buffer.
    return {k: layout.to_block(jax.lax.dynamic_index_in_dim(
        packed[k].reshape(n, layout.slice_length(k)), d, keepdims=False)) for k in layout.keys}

  out = jax.shard_map(per_device, mesh=mesh, in_specs=(param_specs,),
                      out_specs=layout.state_spec, check_vma=False)(params)
  return Packed(layout, out)


def apply_and_gather(layout: ZeroLayout, mesh: Mesh, p_slices: Packed, updates: Packed) -> PyTree:
  """``p + u`` on every device's slice (as ``optax.apply_updates`` computes
  it), then the all-gather of the new params."""
  param_specs = layout.flat.treedef.unflatten(list(layout.specs))

  def per_device(p, u):
    new = {}
    for b in layout.flat.buffers:
      p_next = _update.finish(layout.local_buffer(u[b.key]), layout.local_buffer(p[b.key]),
                              None, "rounded")
      new[b.key] = jax.lax.all_gather(p_next, layout.axis_name, tiled=True)
    return layout.flat.unpack(new)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(layout.state_spec, layout.state_spec),
                       out_specs=param_specs, check_vma=False)(dict(p_slices), dict(updates))


class SlicedUpdate:
  """The jadam optimizer's update of ZeRO's slices, handed to it as the
  ``jadam_slices`` extra argument of ``optimizer.update`` (so it reaches the
  jadam optimizer through ``optax.chain`` and other wrappers).

  ``update`` runs the one update path on every device's slice of the gradient,
  moments and params, in a ``shard_map``; per-parameter norms (LAMB) add
  their partial sums over the devices (:class:`SliceSegments`).
  """

  def __init__(self, layout: ZeroLayout, mesh: Mesh, device_losses=None):
    self.layout = layout
    self.mesh = mesh
    self.calls = 0  # how many jadam optimizers used it while the step traced
    # Each device's loss, shape (N,) sharded over the data axis: under
    # skip_nonfinite the update averages it in the same all-reduce as the
    # finiteness flag and leaves the mean in `mean_loss`.
    self.device_losses = device_losses
    self.mean_loss = None

  def update(self, spec: _core.OptimizerSpec, hp, decay_mask, updates, state, params):
    """``(updates, state, finite)`` of the optimizer ``spec`` (at the
    hyperparameters ``hp``) on the slices (``finite``: with
    ``skip_nonfinite``, whether the step was taken, the same on every device;
    else ``None``)."""
    self.calls += 1
    layout, rule = self.layout, spec.rule
    fn = spec.name
    for name, value in (("updates", updates), ("params", params)):
      if not (isinstance(value, Packed) and value.layout == layout):
        raise ValueError(
            f"`{fn}(..., jadam_slices=...)`: `{name}` must be the strategy's packed "
            f"slices (a jadam.Packed of its layout), got {type(value).__name__}")
    _core.check_state(fn, rule, state)
    if decay_mask is None:
      decay_mask = (True,) * layout.flat.num_leaves
    use_wd = _update.uses_weight_decay(hp)
    static_hp, dynamic_hp = _update.split_hyper(hp)
    scale_lr = spec.learning_rate is not None
    state_specs = _core.state_class(rule)(
        P(), *(layout.state_spec for _ in rule.moment_names))

    with_loss = rule.skip_nonfinite and self.device_losses is not None

    def per_device(dynamic_hp, g, state, p, losses):
      d = jax.lax.axis_index(layout.axis_name)
      chunks = [_update.Chunk(
          layout.local_buffer(g[b.key]),
          tuple(layout.local_buffer(getattr(state, n)[b.key]) for n in rule.moment_names),
          layout.local_buffer(p[b.key]), SliceSegments(layout, b.key, d),
          tuple(decay_mask[i] for i in b.leaves)) for b in layout.flat.buffers]
      finite = mean_loss = None
      if rule.skip_nonfinite:
        # Each device sees its slice: every device must skip if any slice is
        # not finite. The count of bad slices rides with the loss in one
        # all-reduce over the data axis (other mesh axes add a scalar one).
        bad = 1 - _update.all_finite([c.grad for c in chunks]).astype(jnp.float32)
        if with_loss:
          both = jax.lax.psum(jnp.stack([losses[0].astype(jnp.float32), bad]),
                              layout.axis_name)
          mean_loss = (both[0] / layout.num_shards).astype(losses.dtype)
          bad = both[1]
        others = tuple(a for a in self.mesh.axis_names
                       if a != layout.axis_name or not with_loss)
        if others:
          bad = jax.lax.psum(bad, others)
        finite = bad == 0
      # The XLA ops or the fused kernel on this device's slices (local
      # arrays: shard_map's axes are manual).
      count_inc, results, finite = _kernel.update_and_finish(
          rule, _update.merge_hyper(static_hp, dynamic_hp), state.count, chunks,
          use_wd=use_wd, scale_lr=scale_lr, apply=None,
          out_dtypes=[_update.update_dtype(rule, b.dtype) for b in layout.flat.buffers],
          finite=finite)
      u = {b.key: layout.to_block(r[0]) for b, r in zip(layout.flat.buffers, results)}
      moments = [Packed(layout, {b.key: layout.to_block(r[1][j])
                                 for b, r in zip(layout.flat.buffers, results)})
                 for j in range(len(rule.moment_names))]
      return (Packed(layout, u), _core.state_class(rule)(count_inc, *moments), finite,
              mean_loss)

    # check_vma=False: nothing here is differentiated, and the buffers mix
    # leaves sharded over the other axes with replicated ones.
    losses = self.device_losses if with_loss else jnp.zeros((layout.num_shards,))
    updates, state, finite, mean_loss = jax.shard_map(
        per_device, mesh=self.mesh,
        in_specs=(P(), layout.state_spec, state_specs, layout.state_spec,
                  P(layout.axis_name)),
        out_specs=(layout.state_spec, state_specs, P(), P()),
        check_vma=False)(dynamic_hp, updates, state, params, losses)
    if with_loss:
      self.mean_loss = mean_loss
    return updates, state, finite
