"""The flat layout: FlatLayout packing, the flat functional core, and flat-vs-tree parity."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
from jadam import _flat
from jadam import _kernel
from jadam import _segments
from jadam import FlatLayout

from _trees import adam_node, grads_like

N_STEPS = 32
F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: one float32 ulp at 1
BF16_EPS = 2.0**-7  # one bfloat16 ulp at 1 (8 significant bits)


def mixed_tree():
  """float32 and bfloat16 leaves (two buffers), None, zero-size and scalar leaves,
  and one leaf of each dtype above MAX_PACKED_LEAF (a buffer of its own in the
  optimizers' flat state)."""
  rng = np.random.default_rng(0)
  r = lambda dt, *s: jnp.asarray(rng.normal(size=s), dt)
  big = _flat.MAX_PACKED_LEAF + 40
  return {
      "dense": {"w": r(jnp.float32, 33, 40), "b": r(jnp.float32, 40)},
      "half": {"w": r(jnp.bfloat16, 17, 9), "b": r(jnp.bfloat16, 5), "s": r(jnp.bfloat16)},
      "blocks": [(r(jnp.float32, 2, 3, 4), None), (r(jnp.float32, 1), r(jnp.float32))],
      "empty": jnp.zeros((0, 3), jnp.float32),
      "empty_half": jnp.zeros((2, 0), jnp.bfloat16),
      "none": None,
      "big": r(jnp.float32, big),
      "big_half": r(jnp.bfloat16, 2, big // 2),
  }


def decay_matrices(params):
  return jax.tree.map(lambda x: x is not None and x.ndim >= 2, params,
                      is_leaf=lambda x: x is None)


lr_schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 8, N_STEPS, 1e-3)

# Every optimizer of the core issue, in the configurations that matter for a layout
# (masks and schedules reach the flat pass as packed masks and traced scalars).
CONFIGS = {
    "adam": lambda **kw: jadam.adam(1e-2, **kw),
    "adamw_mask_schedule": lambda **kw: jadam.adamw(
        lr_schedule, weight_decay=optax.linear_schedule(0.2, 0.0, N_STEPS),
        mask=decay_matrices, **kw),
    "nadam": lambda **kw: jadam.nadam(1e-2, **kw),
    "nadamw": lambda **kw: jadam.nadamw(1e-2, weight_decay=0.05, **kw),
    "amsgrad": lambda **kw: jadam.amsgrad(1e-2, **kw),
    "adamax": lambda **kw: jadam.adamax(1e-2, **kw),
    "adamaxw_mask": lambda **kw: jadam.adamaxw(1e-2, weight_decay=0.1, mask=decay_matrices, **kw),
    "radam": lambda **kw: jadam.radam(lr_schedule, nesterov=True, threshold=4.0, **kw),
    "lamb_mask": lambda **kw: jadam.lamb(1e-2, weight_decay=0.1, mask=decay_matrices, **kw),
    "scale_by_adam": lambda **kw: jadam.scale_by_adam(eps_root=1e-10, nesterov=True, **kw),
}
ELEMENTWISE = [n for n in CONFIGS if not n.startswith("lamb")]


def optimizer_layout(params) -> FlatLayout:
  """The layout of a ``layout="flat"`` optimizer's state for ``params``."""
  return FlatLayout.from_tree(params, max_packed_leaf=_flat.MAX_PACKED_LEAF)


def _map_moments(state, fn):
  """``state`` with ``fn`` applied to every moment (mu, nu, nu_max) of its
  moments node(s): optax's ScaleBy*State inside an optimizer state, or a
  functional jadam.AdamState."""
  def is_node(x):
    return hasattr(x, "_fields") and "mu" in x._fields

  return jax.tree.map(
      lambda x: x._replace(**{k: fn(getattr(x, k)) for k in x._fields if k != "count"})
      if is_node(x) else x, state, is_leaf=is_node)


def state_as_tree(state, layout):
  """A flat optimizer state with its packed moments unpacked (tree-layout form)."""
  return _map_moments(state, layout.unpack)


def gradient(params, step):
  # Param-independent gradients with exact zeros every 7th step: errors never
  # feed back through the loss, and zero gradients are exercised.
  if step % 7 == 3:
    return jax.tree.map(jnp.zeros_like, params)
  return grads_like(params, step)


def run(tx, params, n_steps=N_STEPS):
  """Per-step updates, params and states (all as host trees) of ``n_steps`` jitted steps."""
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return u, optax.apply_updates(p, u), s

  state = tx.init(params)
  hist = []
  for t in range(n_steps):
    u, params, state = step(params, state, gradient(params, t))
    hist.append((u, params, state))
  return hist


# ------------------------------------------------------------------ the layout


def test_layout_buffers_offsets_and_padding():
  params = mixed_tree()
  layout = FlatLayout.from_tree(params)
  assert layout.keys == ("bfloat16", "float32")
  f32, bf16 = layout.buffer("float32"), layout.buffer("bfloat16")
  n_f32 = 33 * 40 + 40 + 24 + 1 + 1 + 0 + _flat.MAX_PACKED_LEAF + 40
  assert f32.size == n_f32 and bf16.size == 17 * 9 + 5 + 1 + 0 + 2 * ((_flat.MAX_PACKED_LEAF + 40) // 2)
  for b in layout.buffers:
    assert b.length % 1024 == 0 and b.size <= b.length < b.size + 1024
  # Leaves are contiguous, in tree order, per dtype.
  segs = [s for s in layout.segments if s is not None]
  for key in layout.keys:
    offsets = [(s.offset, s.size) for s in segs if s.key == key]
    assert offsets[0][0] == 0
    assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(offsets, offsets[1:]))
  assert layout.num_leaves == len(jax.tree.leaves(params, is_leaf=lambda x: x is None))
  assert layout.size == f32.size + bf16.size

  shapes = layout.shape_dtypes()
  assert shapes["float32"].shape == (f32.length,) and shapes["bfloat16"].dtype == jnp.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(layout.tree_shape_dtypes(), params)


def test_pad_multiple_and_own_buffers():
  params = mixed_tree()
  layout = FlatLayout.from_tree(params, pad_multiple=1)
  assert all(b.length == b.size for b in layout.buffers if b.size)
  assert FlatLayout.from_tree(params, pad_multiple=96).buffer("float32").length % 96 == 0

  own = optimizer_layout(params)
  # Flattening order: big (0), big_half (1), ...: the two large leaves.
  assert set(own.keys) == {"bfloat16", "float32", "float32.leaf0", "bfloat16.leaf1"}
  assert own.buffer("float32.leaf0").leaves == (0,)
  assert own.buffer("float32.leaf0").length % 1024 == 0
  chex.assert_trees_all_equal(own.unpack(own.pack(params)), params)

  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="pad_multiple"):
      FlatLayout.from_tree(params, pad_multiple=bad)
  with pytest.raises(ValueError, match="max_packed_leaf"):
    FlatLayout.from_tree(params, max_packed_leaf=-1)


def test_layout_is_static_hashable_and_cached():
  params = mixed_tree()
  a = FlatLayout.from_tree(params)
  b = FlatLayout.from_tree(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  assert a is b and hash(a) == hash(b)
  assert a != FlatLayout.from_tree(params, pad_multiple=128)
  assert "float32" in repr(a)

  f = jax.jit(lambda tree, layout: layout.unpack(layout.pack(tree)), static_argnums=1)
  chex.assert_trees_all_equal(f(params, a), params)


def test_pack_unpack_roundtrip_eager_and_jit():
  params = mixed_tree()
  layout = FlatLayout.from_tree(params)
  for pack in (layout.pack, jax.jit(layout.pack)):
    packed = pack(params)
    assert set(packed) == {"float32", "bfloat16"}
    assert packed["bfloat16"].dtype == jnp.bfloat16
    for b in layout.buffers:
      assert packed[b.key].shape == (b.length,)
      assert not np.asarray(packed[b.key][b.size:], np.float32).any()  # zero padding
    back = jax.jit(layout.unpack)(packed)
    chex.assert_trees_all_equal(back, params)  # None leaves come back as None
    chex.assert_trees_all_equal_shapes_and_dtypes(back, params)


def test_pack_casts_or_promotes():
  params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.bfloat16)}
  layout = FlatLayout.from_tree(params)
  grads = {"a": jnp.full(3, 1 / 3, jnp.float32), "b": jnp.ones(2, jnp.float32)}
  assert layout.pack(grads)["bfloat16"].dtype == jnp.bfloat16
  promoted = layout.pack(grads, dtype="promote")["bfloat16"]
  assert promoted.dtype == jnp.float32 and promoted[0] == np.float32(1 / 3)
  with pytest.raises(ValueError, match="dtype"):
    layout.pack(grads, dtype="float16")


def test_pack_unpack_errors_name_the_path():
  params = mixed_tree()
  layout = FlatLayout.from_tree(params)
  wrong_shape = {**params, "dense": {"w": jnp.ones((40, 33)), "b": params["dense"]["b"]}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['w'\].*\(40, 33\)"):
    layout.pack(wrong_shape)
  with pytest.raises(ValueError, match="none"):
    layout.pack({**params, "none": jnp.ones(2)})
  with pytest.raises(ValueError, match="different tree structures"):
    layout.pack({"w": jnp.ones(3)})
  packed = layout.pack(params)
  with pytest.raises(ValueError, match="keys"):
    layout.unpack({"float32": packed["float32"]})
  with pytest.raises(ValueError, match="shape"):
    layout.unpack({**packed, "float32": packed["float32"][:-1024]})


def test_segment_ids_and_mask_buffers():
  params = {"a": jnp.ones(3), "z": jnp.ones((0,)), "b": jnp.ones((2, 2)), "h": jnp.ones(2, jnp.bfloat16)}
  layout = FlatLayout.from_tree(params, pad_multiple=8)
  # float32 leaves a, b, z (zero-size): ids 0, 1, (2); padding gets 3.
  np.testing.assert_array_equal(layout.segment_ids("float32"), [0, 0, 0, 1, 1, 1, 1, 3])
  masks = layout.mask_buffers({"a": True, "z": True, "b": False, "h": True})
  np.testing.assert_array_equal(masks["float32"], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(masks["bfloat16"], [1, 1, 0, 0, 0, 0, 0, 0])
  # A prefix mask, and a per-leaf sequence in flattening order (a, b, h, z).
  assert not layout.mask_buffers(False)["float32"].any()
  np.testing.assert_array_equal(layout.mask_buffers([True, False, True, True])["float32"],
                                masks["float32"])
  with pytest.raises(ValueError, match="mask"):
    layout.mask_buffers({"a": 1})


@pytest.mark.parametrize("pad_multiple", [1024, 7])
def test_segment_norms_and_masks_in_graph(pad_multiple):
  """The bit-packed in-graph expansions equal their numpy definitions."""
  rng = np.random.default_rng(3)
  sizes = [0, 1, 31, 32, 33, 5, 0, 100, 2, 64, 1, 3]  # boundaries at and off 32-element rows
  tree = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]
  layout = FlatLayout.from_tree(tree, pad_multiple=pad_multiple)
  segs = _segments.BufferSegments(layout, "float32")
  x = layout.pack(tree)["float32"]
  y = 2.0 * x
  (nx, ny), ids = jax.jit(lambda x, y: (_segments.segment_norms(segs.table, (x, y)),
                                        _segments.segment_ids(segs.table)))(x, y)
  nonempty = [t for t in tree if t.size]
  want = [np.linalg.norm(np.asarray(t, np.float64)) for t in nonempty]
  np.testing.assert_allclose(np.asarray(nx)[:len(want)], want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ny)[:len(want)], 2 * np.asarray(want), rtol=1e-6)
  seg_of_leaf = np.cumsum([n > 0 for n in sizes]) - 1
  expected_ids = np.repeat(seg_of_leaf[[n > 0 for n in sizes]], [n for n in sizes if n])
  np.testing.assert_array_equal(np.asarray(ids)[:len(expected_ids)], expected_ids)

  flags = [bool(i % 2) for i in range(len(sizes))]
  bits = layout.mask_buffers(flags)["float32"]
  got = jax.jit(lambda: jnp.asarray(_segments.mask_elements(bits)))()
  np.testing.assert_array_equal(np.asarray(got), bits)
  # The same mask from per-leaf flags, and no buffer-sized constant in the program.
  selected = jax.jit(lambda: jnp.asarray(segs.select(flags)))
  np.testing.assert_array_equal(np.asarray(selected()), bits)
  length = layout.buffer("float32").length
  constants = [line for line in selected.lower().as_text().splitlines()
               if "stablehlo.constant" in line]
  assert constants and not any(f"tensor<{length}x" in line for line in constants)


def test_grad_through_unpack_is_packed_and_zero_padded():
  params = mixed_tree()
  layout = FlatLayout.from_tree(params)
  packed = layout.pack(params)

  def loss(packed):
    p = layout.unpack(packed)
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(p))

  grads = jax.jit(jax.grad(loss))(packed)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, packed)
  tree_grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32)))
                                      for x in jax.tree.leaves(p)))(params)
  chex.assert_trees_all_close(layout.unpack(grads), tree_grads, rtol=1e-6, atol=0)
  for b in layout.buffers:
    assert not np.asarray(grads[b.key][b.size:], np.float32).any()


@pytest.mark.usefixtures("default_kernel_mode")  # "auto" on a mesh, whatever $JADAM_KERNEL says
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_pack_unpack_under_donation_and_sharding(axis_type):
  params = mixed_tree()
  layout = FlatLayout.from_tree(params)  # 1024-multiple lengths: shard over 8 devices
  mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  sharded = NamedSharding(mesh, P("x"))
  replicated = NamedSharding(mesh, P())
  packed = jax.jit(layout.pack, out_shardings=sharded)(params)
  for buf in packed.values():
    assert buf.sharding == sharded
    assert buf.addressable_shards[0].data.shape == (buf.shape[0] // 8,)
  back = jax.jit(layout.unpack, out_shardings=replicated)(packed)
  chex.assert_trees_all_equal(back, params)

  state = jax.jit(jadam.init, out_shardings=jadam.AdamState(replicated, sharded, sharded))(packed)
  grads = jax.jit(layout.pack, out_shardings=sharded)(grads_like(params, 0))

  # On arrays that GSPMD splits "auto" runs the kernel on each device's shard
  # (where it is built), on an Explicit mesh XLA's ops; so does the unsplit
  # reference here, for a comparison bit for bit.
  kernel = "fused" if axis_type == "Auto" and _kernel.available() else "xla"
  step = jax.jit(lambda g, s, p: jadam.step(g, s, p, learning_rate=0.1), donate_argnums=(1, 2))
  ref = jadam.step(jax.device_get(grads), jax.device_get(state), jax.device_get(packed),
                   learning_rate=0.1, kernel=kernel)
  new_packed, new_state = step(grads, state, packed)
  assert all(buf.is_deleted() for buf in jax.tree.leaves((packed, state)))  # donated
  assert new_packed["float32"].sharding.is_equivalent_to(sharded, 1)
  chex.assert_trees_all_equal(jax.device_get((new_packed, new_state)), ref)


# ------------------------------------------------------- flat end to end (core)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_functional_core_flat_end_to_end_equals_tree(weight_decay):
  """Params kept packed; the loss unpacks; jax.grad gives packed gradients;
  jadam.step runs one pass per buffer and equals the tree form step for step."""
  # float32 here: bfloat16 packing is covered above, and a bfloat16 rounding flip
  # would feed back through the loss.
  params = jax.tree.map(lambda x: x.astype(jnp.float32), mixed_tree())
  layout = FlatLayout.from_tree(params)
  target = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)

  def tree_loss(p):
    return sum(jnp.sum((x.astype(jnp.float32) - t.astype(jnp.float32)) ** 2 * (1 + i))
               for i, (x, t) in enumerate(zip(jax.tree.leaves(p), jax.tree.leaves(target))))

  kw = dict(learning_rate=1e-2, weight_decay=weight_decay, nesterov=True)

  @jax.jit
  def flat_step(packed, state):
    grads = jax.grad(lambda q: tree_loss(layout.unpack(q)))(packed)
    return jadam.step(grads, state, packed, **kw)

  # The reference: gradient and update as separate programs (XLA does not rewrite
  # the loss's arithmetic together with the update's).
  tree_grad = jax.jit(jax.grad(tree_loss))
  tree_update = jax.jit(lambda g, p, state: jadam.step(g, state, p, **kw))

  def tree_step(p, state):
    return tree_update(tree_grad(p), p, state)

  packed, fstate = layout.pack(params), jadam.init(layout.pack(params))
  tparams, tstate = params, jadam.init(params)
  for _ in range(N_STEPS):
    packed, fstate = flat_step(packed, fstate)
    tparams, tstate = tree_step(tparams, tstate)
    # Compiled into one program with its loss, the update's arithmetic may be
    # rewritten together with the gradient's (a fused and an unfused *flat*
    # step already differ by an ulp): float32 rounding, compounded over steps.
    chex.assert_trees_all_close(layout.unpack(packed), tparams, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_as_tree(fstate, layout), tstate, rtol=1e-5, atol=1e-6)
  for b in layout.buffers:  # padding elements never move
    for buf in (packed[b.key], fstate.mu[b.key], fstate.nu[b.key]):
      assert not np.asarray(buf[b.size:], np.float32).any()


def test_functional_update_on_packed_buffers():
  params = mixed_tree()
  layout = FlatLayout.from_tree(params)
  packed, grads = layout.pack(params), layout.pack(grads_like(params, 1))
  updates, state = jadam.update(grads, jadam.init(packed), packed, learning_rate=0.1)
  ref_updates, ref_state = jadam.update(grads_like(params, 1), jadam.init(params), params,
                                        learning_rate=0.1)
  _assert_trees_close(layout.unpack(updates), ref_updates)
  _assert_trees_close(state_as_tree(state, layout), ref_state)


# ---------------------------------------------------- flat optimizers (tree in/out)


def _assert_state_is_flat(state, layout):
  state = adam_node(state)
  for name in ("mu", "nu") + (("nu_max",) if hasattr(state, "nu_max") else ()):
    packed = getattr(state, name)
    assert isinstance(packed, jadam.Packed) and packed.layout == layout
    layout.check_packed(name, packed)


def _ulp(x: np.ndarray, dtype) -> np.ndarray:
  """One ulp of |x| in ``dtype`` (float32 or bfloat16), as float32."""
  sp = np.spacing(np.abs(np.asarray(x, np.float32)))
  return sp * 2.0**16 if np.dtype(dtype) == jnp.bfloat16 else sp


def _trust_ratio_rtol(n: int) -> float:
  """Relative bound on the difference of two LAMB trust ratios whose squared
  norms sum the same n float32 terms in different orders.

  Every ordering of a sum of n non-negative float32 terms is within
  gamma_{n-1} = (n-1)u/(1-(n-1)u) of the exact sum (u = 2**-24; Higham, Accuracy
  and Stability of Numerical Algorithms, 2nd ed., eq. 4.4), so two orderings
  differ by at most 2 gamma_{n-1}. A square root halves a relative error and
  adds u; the ratio of two such norms adds both errors and u. In all at most
  2 gamma_{n-1} + 3u; 4(n+2)u covers it with room for gamma's denominator.
  """
  return 4 * (n + 2) * (F32_EPS / 2)


def _assert_leaf_close(got, want, dtype, rtol, what):
  """|got - want| <= rtol * (|want| + max|want|) (+ one ulp for bfloat16).

  Rounding errors scale with the terms of a computation, not with its result:
  where decoupled weight decay cancels the Adam direction an update is tiny
  while its terms are not, so the bound also scales with the leaf's largest
  value. A bfloat16 result is a rounding of float32 values within that bound:
  one more bfloat16 ulp.
  """
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not want.size:
    return
  bound = rtol * (np.abs(want) + np.abs(want).max())
  if np.dtype(dtype) == jnp.bfloat16:
    bound = bound + _ulp(np.maximum(np.abs(got), np.abs(want)), dtype)
  bad = np.abs(got - want) > bound
  assert not bad.any(), (what, got[bad][:4], want[bad][:4])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flat_matches_tree(name):
  """Every optimizer over 32 steps: updates, params and every state leaf of the
  flat form equal the tree form's, to float32 rounding.

  Each step starts both layouts from the same (tree-form) params and state: the
  comparison is of one step's arithmetic, not of accumulated roundings. The
  elementwise rules run the same float32 operations in both layouts (on CPU they
  agree bit for bit but for an occasional reciprocal-versus-division ulp): rtol
  1e-6. LAMB's per-parameter norms are segment sums over the packed buffer,
  differing from ``jnp.linalg.norm`` in summation order only: the rtol of
  :func:`_trust_ratio_rtol` for the leaf's size, plus 1e-6 for the rest.
  """
  params = mixed_tree()
  layout = optimizer_layout(params)
  tree_tx, flat_tx = CONFIGS[name](), CONFIGS[name](layout="flat")
  tree_step, flat_step = jax.jit(tree_tx.update), jax.jit(flat_tx.update)
  state = tree_tx.init(params)
  flat_state0 = flat_tx.init(params)
  _assert_state_is_flat(flat_state0, layout)
  assert type(flat_state0) is type(state)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = jax.tree.leaves(params)
  for t in range(N_STEPS):
    g = gradient(params, t)
    flat_state = _map_moments(state, layout.pack)
    u_t, state_t = tree_step(g, state, params)
    u_f, state_f = flat_step(g, flat_state, params)
    _assert_state_is_flat(state_f, layout)
    p_t, p_f = optax.apply_updates(params, u_t), optax.apply_updates(params, u_f)
    chex.assert_trees_all_equal_shapes_and_dtypes((u_f, p_f), (u_t, p_t))
    chex.assert_trees_all_equal_shapes_and_dtypes(state_as_tree(state_f, layout), state_t)
    node_f, node_t = adam_node(state_as_tree(state_f, layout)), adam_node(state_t)
    assert int(node_f.count) == int(node_t.count) == t + 1
    for k in node_t._asdict():
      if k != "count":
        for path, x, a, b in zip(paths, leaves, jax.tree.leaves(node_f._asdict()[k]),
                                 jax.tree.leaves(node_t._asdict()[k])):
          _assert_leaf_close(a, b, x.dtype, 1e-6, (t, k, path))
    for path, x, a, b, pa, pb in zip(paths, leaves, jax.tree.leaves(u_f), jax.tree.leaves(u_t),
                                     jax.tree.leaves(p_f), jax.tree.leaves(p_t)):
      rtol = 1e-6 + (_trust_ratio_rtol(x.size) if name.startswith("lamb") else 0.0)
      _assert_leaf_close(a, b, x.dtype, rtol, (t, "updates", path))
      # Params p + u: the update's bound, plus one ulp of the rounded sum.
      a, b, pa, pb = (np.asarray(v, np.float32) for v in (a, b, pa, pb))
      if b.size:
        bound = rtol * (np.abs(b) + np.abs(b).max()) + _ulp(np.maximum(np.abs(pa), np.abs(pb)), x.dtype)
        if x.dtype == jnp.bfloat16:
          bound += _ulp(np.maximum(np.abs(a), np.abs(b)), x.dtype)
        assert np.all(np.abs(pa - pb) <= bound), (t, "params", path)
    params, state = p_t, state_t
  chex.assert_tree_all_finite(jax.tree.leaves(params))


def _assert_trees_close(got, want, rtol=1e-6):
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    _assert_leaf_close(a, b, b.dtype, rtol, jax.tree_util.keystr(path))


def test_flat_float32_trajectories_agree():
  """Independent 32-step runs of both layouts on float32 params (gradients do not
  depend on the params, so no rounding feeds back but through weight decay).
  XLA's ops in both (on CPU the flat layout's small leaves default to the
  kernel, held to the tree layout's kernel bit for bit in
  tests/test_kernel_leafwise.py)."""
  params = jax.tree.map(lambda x: x.astype(jnp.float32), mixed_tree())
  layout = optimizer_layout(params)
  for name in ("adamw_mask_schedule", "amsgrad", "radam"):
    tree_hist = run(CONFIGS[name](kernel="xla"), params)
    flat_hist = run(CONFIGS[name](layout="flat", kernel="xla"), params)
    for (u_t, p_t, s_t), (u_f, p_f, s_f) in zip(tree_hist, flat_hist):
      _assert_trees_close((u_f, p_f, state_as_tree(s_f, layout)), (u_t, p_t, s_t))


def test_flat_optimizer_state_types_no_retrace_and_shape_dtype_init():
  params = mixed_tree()
  tx = jadam.adamw(lr_schedule, weight_decay=0.01, mask=decay_matrices, layout="flat")
  state = tx.init(params)
  assert isinstance(state[0], optax.ScaleByAdamState)  # optax's own tree, moments packed
  abstract = tx.init(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, state)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  types0 = jax.tree.map(jax.typeof, state)
  for t in range(3):
    params, state = step(params, state, gradient(params, t))
  assert jax.tree.map(jax.typeof, state) == types0


def test_flat_optimizer_in_chain_eager_and_without_params():
  params = mixed_tree()
  g = grads_like(params, 2)
  tree_tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-2, kernel="xla"))
  # (XLA's ops on both, whatever $JADAM_KERNEL says: the tree layout's bits.
  # The kernel's: test_kernel_leafwise.py.)
  flat_tx = optax.chain(optax.clip_by_global_norm(1.0),
                        jadam.adam(1e-2, layout="flat", kernel="xla"))
  u_t, _ = tree_tx.update(g, tree_tx.init(params))  # eager, params=None
  u_f, _ = flat_tx.update(g, flat_tx.init(params))
  chex.assert_trees_all_equal(u_f, u_t)


def test_flat_optimizer_errors():
  params = mixed_tree()
  flat = jadam.adamw(1e-2, layout="flat")
  with pytest.raises(ValueError, match="needs `params`"):
    flat.update(params, flat.init(params))
  with pytest.raises(ValueError, match="must be the state of a layout='flat' optimizer"):
    flat.update(params, jadam.adamw(1e-2).init(params), params)  # a tree-layout state
  other = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="the state's flat layout"):
    flat.update(other, flat.init(params), other)
  with pytest.raises(ValueError, match="layout"):
    jadam.adam(1e-2, layout="packed")


# The parity configurations (test_parity.CONFIGS) with a packed state, each
# against optax itself on the mixed tree.
FLAT_PARITY = ["adam_schedule", "adamw_mask", "amsgrad", "adamaxw_mask", "radam_nesterov",
               "nadamw", "lamb_mask", "scale_by_adam"]


@pytest.mark.parametrize("name", FLAT_PARITY)
def test_flat_matches_optax_in_float32_teacher_forced(name):
  """layout="flat" on mixed_tree (bfloat16 leaves, large own-buffer leaves,
  None, zero-size and scalar leaves) against optax.

  Reference: optax on the float32 upcast of the same params, gradients and
  (unpacked) state, its outputs rounded to the stored dtypes, one step at a
  time from the flat run's own state (teacher forced), for N_STEPS steps.
  Bounds: 1e-6 relative (the flat pass's occasional reciprocal-versus-division
  ulp), plus one ulp of the stored dtype for bfloat16 leaves (a float32 ulp
  apart may round to neighbouring bfloat16 values), plus the summation-order
  bound of LAMB's segment norms.
  """
  import test_parity as tp  # the shared optimizer configurations

  params = mixed_tree()
  layout = optimizer_layout(params)
  tx, ref = tp.make(jadam, name, layout="flat"), tp.make(optax, name)
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
  state = tx.init(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = jax.tree.leaves(params)
  for t in range(N_STEPS):
    g = gradient(params, t)
    tree_state = state_as_tree(state, layout)
    ref_state = tp._load_moments(  # pylint: disable=protected-access
        ref.init(up(params)), {k: up(v) if k != "count" else v
                               for k, v in adam_node(tree_state)._asdict().items()})
    u, state = step(g, state, params)
    u_ref, s_ref = ref_step(up(g), ref_state, up(params))
    rtol = 1e-6
    for k, want in tp.moments(s_ref).items():
      got = adam_node(state_as_tree(state, layout))._asdict()[k]
      if k == "count":
        assert int(got) == int(want) == t + 1
        continue
      for path, x, a, b in zip(paths, leaves, jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == x.dtype, (k, path)  # moments stored in the params' dtype
        _assert_leaf_close(a, b, x.dtype, rtol, (t, k, path))
    for path, x, a, b in zip(paths, leaves, jax.tree.leaves(u), jax.tree.leaves(u_ref)):
      assert a.dtype == x.dtype, path
      bound = rtol + (_trust_ratio_rtol(x.size) if name.startswith("lamb") else 0.0)
      _assert_leaf_close(a, b, x.dtype, bound, (t, "updates", path))
    params = optax.apply_updates(params, u)
  chex.assert_tree_all_finite(params)
