"""The ``layout="flat"`` form of every jadam optimizer: tree in, tree out,
moments packed.

The state's moments are :class:`jadam.Packed` buffers of the params'
:class:`jadam.FlatLayout` (leaves of up to :data:`MAX_PACKED_LEAF` elements of
one dtype share a buffer; larger ones have one each). The layout travels with
the state, so ``update`` needs nothing else: not the params, not the
optimizer object that made the state. Each step packs the gradients (and the
params, for weight decay or LAMB), runs the one update path
(:mod:`jadam._update`) once per buffer and unpacks the updates; where the
fused kernel runs, buffers of several leaves are stepped leaf by leaf in
place of the pack and unpack (:mod:`jadam._kernel._leafwise`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _compose
from . import _core
from . import _kernel
from . import _quant
from . import _rule
from . import _segments
from . import _update
from . import _validate as V
from ._layout import PAD_MULTIPLE
from ._layout import FlatLayout
from ._layout import sharded_pad_multiple
from ._packed import Packed
from ._sharding import like_sharding

MAX_PACKED_LEAF = 1 << 15
"""Leaves larger than this (32768 elements) keep a buffer of their own in the
``layout="flat"`` optimizers' state (tree in, tree out). Packing a leaf costs a
copy in and a copy out per step (16 bytes per float32 param, and on CPU fresh
pages for the temporary buffers); that pays only while the leaf is small
enough that its own kernels' fixed cost (microseconds each) dominates."""


def state_layout(fn: str, rule: _rule.Rule, state) -> FlatLayout:
  """The :class:`FlatLayout` a ``layout="flat"`` state carries, or a clear error."""
  _core.check_state(fn, rule, state)
  layouts = [getattr(getattr(state, n), "layout", None) for n in rule.moment_names]
  if not all(isinstance(m, Packed) and isinstance(m.layout, FlatLayout)
             for m in (getattr(state, n) for n in rule.moment_names)) or len(set(layouts)) != 1:
    got = {n: type(getattr(state, n)).__name__ for n in rule.moment_names}
    raise ValueError(
        f"`{fn}(state=...)` must be the state of a layout='flat' optimizer: its "
        f"moments {rule.moment_names} must be jadam.Packed buffers of one "
        f"FlatLayout (made by init, or restored into a target made by init), "
        f"got {got}"
    )
  return layouts[0]


def init_flat_state(fn: str, spec: _core.OptimizerSpec, params):
  """Zero packed moments (count 0) for tree ``params``."""
  if type(params).__name__ == "_ParamsPlaceholder":  # optax.tree_utils.tree_map_params
    raise ValueError(
        f"`{fn}(layout='flat')` keeps its moments packed (state[0].mu is a "
        "jadam.Packed of one buffer per dtype), so its state has no "
        "param-shaped trees for optax.tree_utils.tree_map_params to map; map "
        "the packed buffers with jax.tree.map (`state[0].mu.layout.unpack(...)` "
        "gives the tree), or use layout='tree' (optax's own state layout)")
  for path, leaf in V.flatten_with_none(params)[0]:
    if leaf is not None:
      V.check_params_leaf(fn, path, leaf)
  mesh = _params_mesh(params)
  max_packed, block, _ = quantized_packing(spec)
  if mesh is None:
    layout = FlatLayout.from_tree(params, max_packed_leaf=max_packed)
    template = layout.shape_dtypes()
  else:
    # Params sharded over a mesh: the packed moments are split over all its
    # devices (never replicated), each buffer padded to a multiple of them
    # (and quantized moments' blocks split evenly too).
    layout = FlatLayout.from_tree(
        params, max_packed_leaf=max_packed,
        pad_multiple=math.lcm(sharded_pad_multiple(mesh.size), block * mesh.size))
    template = layout.shape_dtypes(
        sharding=NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names))))
  return _core.init_state(fn, spec.rule, template, spec.mu_dtype, spec.nu_dtype)


def quantized_packing(spec: _core.OptimizerSpec) -> tuple[int, int, int | None]:
  """``(max_packed_leaf, block, small_leaf)`` for packing with ``spec``'s moments.

  With quantized moments the ``layout="flat"`` state gives every leaf of at
  least ``min_quantized_size`` elements a buffer of its own (``max_packed_leaf``),
  quantized exactly as the tree layout quantizes that leaf (same blocks;
  rank-1 over its shape), so the two layouts agree; smaller leaves share
  float32-moment buffers. Packings shared by leaves (ZeRO, the trainer's
  ``layout="flat"``) put the small leaves in a buffer of their own
  (``small_leaf``), which keeps float32 moments. ``block`` is the largest
  block size: buffers split over devices split whole blocks.
  """
  formats = [f for f in _core.moment_formats(spec.rule, spec.mu_dtype, spec.nu_dtype)
             if isinstance(f, _quant.Quantized)]
  if not formats:
    return MAX_PACKED_LEAF, 1, None
  smallest = min(f.min_quantized_size for f in formats)
  return (max(0, min(MAX_PACKED_LEAF, smallest - 1)), max(f.block_size for f in formats),
          smallest)


def optimizer_packing(optimizer) -> tuple[int, int, int | None]:
  """:func:`quantized_packing` of the jadam optimizer in ``optimizer`` (bare,
  or inside optax's wrappers); ``(MAX_PACKED_LEAF, 1, None)`` without one."""
  spec = _compose.jadam_spec(optimizer)
  return (MAX_PACKED_LEAF, 1, None) if spec is None else quantized_packing(spec)


def _params_mesh(params):
  """The mesh of the first param sharded over more than one device (a
  concrete array or ``ShapeDtypeStruct`` with a ``NamedSharding``), or None."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if (isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh)
        and sharding.mesh.size > 1 and any(s is not None for s in sharding.spec)):
      return sharding.mesh
  return None



def flat_update(
    fn: str,
    rule: _rule.Rule,
    hp: _rule.Hyper,
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
    grads: gradients, a tree with the layout's structure and shapes (any
      float dtypes: they are packed promoting, never rounded).
    state: ``AdamState``/``AmsgradState`` with packed moments.
    params: current params (a tree; needed for weight decay and LAMB).
    decay_mask: per-leaf booleans (flattening order): where weight decay
      applies. ``None``: everywhere.
    scale_lr: multiply by ``-learning_rate`` (False for ``scale_by_adam``).

  Returns:
    ``(updates, new_state, finite)``: updates as a tree, the state still
    packed, and (with ``rule.skip_nonfinite``) whether the step was taken.
  """
  layout = state_layout(fn, rule, state).for_tree(
      f"{fn}(updates=...)", grads, "the state's flat layout")
  rule = _kernel.effective_rule(rule)  # JADAM_KERNEL, part of the jit's key
  use_wd = _update.check_params_given(fn, rule, hp, params)
  if params is not None:
    params_layout = layout.for_tree(f"{fn}(params=...)", params, "the state's flat layout")
    if params_layout != layout:  # same leaves, other containers: read them as the updates'
      params = layout.treedef.unflatten(params_layout.leaves_by_index(params))
  static = (rule, layout, _flags(decay_mask, layout), use_wd, params is not None, scale_lr)
  return _update.jitted(_flat_body, static, hp, grads, state, params)


def packed_update(fn: str, rule: _rule.Rule, hp: _rule.Hyper, grads: Packed, state,
                  params: Packed | None = None, *, decay_mask=None, scale_lr: bool = True):
  """One step on packed values (params, gradients and moments all
  :class:`Packed` with one :class:`FlatLayout`): packed updates out."""
  layout = grads.layout
  if not isinstance(layout, FlatLayout):
    raise ValueError(
        f"`{fn}(updates=...)` is packed by {type(layout).__name__}; a jadam optimizer "
        "updates FlatLayout-packed values itself, and sharded ones only inside their "
        "strategy (DataParallel)")
  if state_layout(fn, rule, state) != layout or (
      params is not None and getattr(params, "layout", None) != layout):
    raise ValueError(
        f"`{fn}`: updates, state and params must be packed by the same FlatLayout "
        "(the state made by init from the same packed params)")
  rule = _kernel.effective_rule(rule)
  use_wd = _update.check_params_given(fn, rule, hp, params)
  static = (rule, layout, _flags(decay_mask, layout), use_wd, params is not None, scale_lr)
  return _update.jitted(_packed_body, static, hp, grads, state, params)


def _flags(decay_mask, layout: FlatLayout) -> tuple[bool, ...]:
  return (True,) * layout.num_leaves if decay_mask is None else tuple(decay_mask)


def _buffers_step(static, hp, count, g_packed, moments, p_packed, out_dtypes, finite=None):
  # The flat layout's chunks: one per packed buffer. Results are finished
  # updates in `out_dtypes` (per buffer key).
  rule, layout, decay_mask, use_wd, _, scale_lr = static
  refs = {b.key: _quant.sharding_ref(moments[0][b.key]) for b in layout.buffers}
  chunks = [
      _update.Chunk(
          like_sharding(g_packed[b.key], refs[b.key]), tuple(m[b.key] for m in moments),
          None if p_packed is None else like_sharding(p_packed[b.key], refs[b.key]),
          _segments.BufferSegments(layout, b.key), tuple(decay_mask[i] for i in b.leaves))
      for b in layout.buffers
  ]
  count_inc, results, finite = _kernel.update_and_finish(
      rule, hp, count, chunks, use_wd=use_wd, scale_lr=scale_lr, apply=None,
      out_dtypes=[out_dtypes[b.key] for b in layout.buffers],
      for_mesh=layout.pad_multiple != PAD_MULTIPLE, finite=finite)
  new_moments = [Packed(layout, {b.key: moms[j] for b, (_, moms) in zip(layout.buffers, results)})
                 for j in range(len(rule.moment_names))]
  return (count_inc, {b.key: u for b, (u, _) in zip(layout.buffers, results)}, new_moments,
          finite)


def _flat_body(static, hp, grads, state, params):
  rule, layout, decay_mask, use_wd, has_params, scale_lr = static
  # Params are read only for weight decay, the trust ratio and master
  # weights: plain Adam never packs them (one fewer copy of every leaf per step).
  read_params = params if has_params and (use_wd or rule.trust_ratio or rule.master) else None
  moments = [getattr(state, n) for n in rule.moment_names]
  # The tree form returns updates in the params' dtypes (else the gradients',
  # promoted per buffer as packing them promotes them).
  g_flat = layout.leaves_by_index(grads)
  out_dtypes = {b.key: _update.update_dtype(rule, b.dtype) if has_params else
                jnp.result_type(*[g_flat[i] for i in b.leaves]) for b in layout.buffers}
  # Buffers shared by several leaves step on the kernel without a pack or an
  # unpack (where it runs: _kernel._leafwise); the others are packed.
  on_kernel = _kernel.leafwise_keys(rule, hp, state.count, layout, grads, moments,
                                    read_params)
  parts = [(keys, _restricted(layout, keys)) for keys in
           (on_kernel, tuple(k for k in layout.keys if k not in on_kernel)) if keys]
  finite = None
  if rule.skip_nonfinite and len(parts) > 1:  # one flag for both parts
    finite = _update.all_finite([x for x in g_flat if x is not None])
  results = []
  for keys, sub in parts:
    sub_static = (rule, sub) + static[2:]
    sub_moments = [Packed(sub, {k: m[k] for k in keys}) for m in moments]
    sub_grads, sub_params = _only(sub, grads), _only(sub, read_params)
    if keys is on_kernel:
      results.append(_kernel.leafwise_update(
          rule, hp, state.count, sub, sub_grads, sub_moments, sub_params, decay_mask,
          use_wd=use_wd, scale_lr=scale_lr, out_dtypes=out_dtypes, finite=finite,
          xla=functools.partial(_pack_and_step, sub_static, out_dtypes,
                                rule=dataclasses.replace(rule, kernel="xla"))))
    else:
      results.append(_pack_and_step(sub_static, out_dtypes, hp, state.count, sub_grads,
                                    sub_moments, sub_params, finite=finite))
  count_inc, finite = results[0][0], results[0][3]
  # Each leaf's update from the part that holds it.
  flats = [layout.leaves_by_index(r[1]) for r in results]
  updates = layout.treedef.unflatten(
      [next((x for x in xs if x is not None), None) for xs in zip(*flats)])
  new_moments = [Packed(layout, {k: x for r in results for k, x in r[2][j].items()})
                 for j in range(len(moments))]
  if not has_params:
    updates = jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), updates, grads)
  # Each update leaf sharded like its param (or gradient) on an Explicit mesh.
  updates = jax.tree.map(like_sharding, updates, params if has_params else grads)
  return updates, _core.state_class(rule)(count_inc, *new_moments), finite


def _restricted(layout: FlatLayout, keys) -> FlatLayout:
  """``layout`` with only the buffers ``keys`` (the others' leaves as None)."""
  if tuple(keys) == tuple(layout.keys):
    return layout
  return FlatLayout(layout.treedef, tuple(s if s is not None and s.key in keys else None
                                          for s in layout.segments),
                    tuple(b for b in layout.buffers if b.key in keys), layout.pad_multiple)


def _only(sub: FlatLayout, tree):
  """``tree``'s leaves that ``sub`` holds (the others None)."""
  if tree is None:
    return None
  return sub.treedef.unflatten([x if s is not None else None
                                for x, s in zip(sub.leaves_by_index(tree), sub.segments)])


def _pack_and_step(static, out_dtypes, hp, count, grads, moments, params, *, finite=None,
                   rule=None):
  """Packs the gradients (and params), steps each buffer (XLA's ops or the
  packed kernel) and unpacks the updates: ``(new count, updates, new
  moments, finite)``."""
  layout = static[1]
  if rule is not None:
    static = (rule,) + static[1:]
  g_packed = layout.pack(grads, dtype="promote")
  p_packed = None if params is None else layout.pack(params)
  count_inc, out, new_moments, finite = _buffers_step(
      static, hp, count, g_packed, moments, p_packed, out_dtypes, finite=finite)
  return count_inc, layout.unpack(out), new_moments, finite


def _packed_body(static, hp, grads, state, params):
  rule, layout = static[:2]
  moments = [getattr(state, n) for n in rule.moment_names]
  ref = params if params is not None else grads
  out_dtypes = {b.key: _update.update_dtype(rule, ref[b.key].dtype) for b in layout.buffers}
  count_inc, out, new_moments, finite = _buffers_step(static, hp, state.count, grads, moments,
                                                      params, out_dtypes)
  updates = Packed(layout, out)
  return updates, _core.state_class(rule)(count_inc, *new_moments), finite
