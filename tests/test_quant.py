"""Quantized moments (``mu_dtype``/``nu_dtype`` = ``"q8"``, ``"q4"``,
``jadam.Quantized``): the code maps and their error bounds against a float64
NumPy reference; bytes per parameter measured from the state arrays; tree
equals flat; jit, vmap, donation; convergence of a teacher-student
regression against float32 Adam; the data-parallel strategies and ZeRO
against the same optimizer on one device; checkpoints across device counts;
memory_plan and bad input."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
import jadam.checkpoint
import jadam.parallel
from jadam import _codes
from jadam import _quant as Q
from _trees import adam_node

FORMATS = [(name, moment) for name in ("q8", "q4") for moment in ("mu", "nu")]


def qarrays(tree) -> list:
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jadam.QArray))
          if isinstance(x, jadam.QArray)]


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --------------------------------------------------------------- code maps


@pytest.mark.parametrize("bits,code,signed", [
    (8, "dynamic", True), (8, "dynamic", False), (4, "dynamic", True),
    (4, "dynamic", False), (8, "linear", True), (4, "linear", False)])
def test_code_maps(bits, code, signed):
  t = _codes.code_map(bits, code, signed).astype(np.float64)
  assert t.size == 2 ** bits and np.all(np.diff(t) > 0)
  assert t[-1] == 1.0 and t[0] >= (-1.0 if signed else 0.0)
  if code == "dynamic":
    assert (0.0 in t) == signed  # nu's maps never hold zero
    # The dynamic map is fine near zero: its smallest non-zero magnitude is
    # 10^-(bits-2) of the block maximum times the first decade's midpoint.
    assert np.min(np.abs(t[t != 0])) < 10.0 ** -(bits - 2)
  if code == "linear" and not signed:
    # nu's 4-bit map leaves out zero: 1/sqrt(nu) stays finite.
    np.testing.assert_array_equal(t, np.arange(1, 2 ** bits + 1) / 2 ** bits)


@pytest.mark.parametrize("bits,code,signed", [
    (8, "dynamic", True), (8, "dynamic", False), (4, "dynamic", True),
    (4, "dynamic", False), (8, "linear", True), (4, "linear", False)])
def test_nearest_code_is_the_nearest(bits, code, signed):
  # The closed-form rounding against a brute-force search of the table, on
  # random values, the codes themselves and both sides of every midpoint.
  t = _codes.code_map(bits, code, signed).astype(np.float64)
  rng = np.random.default_rng(bits)
  low = -1.0 if signed else 0.0
  mids = (t[1:] + t[:-1]) / 2
  x = np.concatenate([rng.uniform(low, 1, 20000), rng.uniform(0, 1, 5000) ** 8, t,
                      mids * (1 + 1e-5), mids * (1 - 1e-5), [low, 0.0, 1.0]])
  if signed:
    x = np.concatenate([x, -rng.uniform(0, 1, 5000) ** 8])
  x = x.astype(np.float32)
  nearest = jax.jit(_codes.nearest, static_argnums=(1, 2, 3))
  idx = np.asarray(nearest(jnp.asarray(x), bits, code, signed)).astype(int)
  dist = np.abs(x.astype(np.float64)[:, None] - t[None])
  # float32 x / norm may round a hair past a midpoint: 2e-7 of slack.
  assert np.all(dist[np.arange(x.size), idx] <= dist.min(axis=1) + 2e-7)


def reference_roundtrip(x: np.ndarray, fmt: Q.Quantized, rank1: bool):
  """float64 NumPy reference: the normalizer of every element and the
  nearest code's value."""
  x = np.asarray(x, np.float64)
  table = fmt.table.astype(np.float64)
  if rank1:
    a = np.abs(x)
    stats = [a.max(axis=tuple(j for j in range(a.ndim) if j != i)) for i in range(a.ndim)]
    norm = stats[0].reshape((-1,) + (1,) * (a.ndim - 1))
    for i, s in enumerate(stats[1:], 1):
      norm = np.minimum(norm, s.reshape((1,) * i + (-1,) + (1,) * (a.ndim - i - 1)))
    norm = np.broadcast_to(norm, x.shape)
  else:
    flat = x.reshape(-1)
    nb = -(-flat.size // fmt.block_size)
    blocks = np.zeros(nb * fmt.block_size)
    blocks[:flat.size] = flat
    absmax = np.abs(blocks.reshape(nb, -1)).max(axis=1)
    norm = np.repeat(absmax, fmt.block_size)[:flat.size].reshape(x.shape)
  xn = np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0)
  best = table[np.argmin(np.abs(xn[..., None] - table), axis=-1)]
  return norm, xn, best


def samples(kind, shape, signed, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    x = rng.normal(size=shape)
  elif kind == "heavy":  # Cauchy: a few huge entries per block
    x = rng.standard_cauchy(size=shape)
  else:  # zero blocks, and zero rows/columns inside non-zero ones
    x = rng.normal(size=shape)
    x.reshape(-1)[:512] = 0.0
    x[..., :3] = 0.0
  x = x.astype(np.float32)
  return x if signed else x * x


@pytest.mark.parametrize("name,moment", FORMATS)
@pytest.mark.parametrize("shape", [(64, 96), (5000,)])
def test_roundtrip_within_the_maps_error_bound(name, moment, shape):
  fmt = Q.for_moment(name, moment)
  view = Q.zeros(fmt, shape).view
  rank1 = view is not None
  assert rank1 == (fmt.rank1 and len(shape) >= 2)
  roundtrip = jax.jit(lambda x: Q.decode(Q.encode(x, fmt, shape, view)))
  bound = _codes.max_error(fmt.table, fmt.signed)
  for kind in ("normal", "heavy", "zeros"):
    x = samples(kind, shape, fmt.signed, seed=len(shape))
    got = np.asarray(roundtrip(jnp.asarray(x)), np.float64)
    norm, xn, best = reference_roundtrip(x, fmt, rank1)
    # The code chosen is a nearest one (up to float32 rounding of x / norm).
    got_n = np.where(norm > 0, got / np.where(norm > 0, norm, 1), 0)
    assert np.all(np.abs(got_n - xn) <= np.abs(best - xn) + 1e-6), kind
    # The map's error bound, in units of each element's normalizer.
    assert np.all(np.abs(got - x) <= (bound + 1e-6) * norm + 1e-30), kind
    # Zero blocks (and zero normalizers) decode to exactly zero.
    np.testing.assert_array_equal(got[norm == 0], 0.0)
    if kind == "zeros" and not rank1:
      np.testing.assert_array_equal(got.reshape(-1)[:512], 0.0)
    if not fmt.signed:
      # nu's zero-free maps: no element of a non-zero block decodes to zero.
      assert np.all(got[norm > 0] > 0), kind


def test_four_bit_codes_pack_two_per_byte():
  idx = jnp.arange(32, dtype=jnp.uint8) % 16
  packed = _codes.pack(idx, 4)
  assert packed.shape == (16,) and packed.dtype == jnp.uint8
  chex.assert_trees_all_equal(_codes.unpack(packed, 4), idx)


# ------------------------------------------------------------- bytes per param


def large_tree():
  k = jax.random.split(jax.random.key(0), 3)
  return {"w1": jax.random.normal(k[0], (512, 1024)), "w2": jax.random.normal(k[1], (1024, 512)),
          "emb": jax.random.normal(k[2], (256, 1024))}


@pytest.mark.parametrize("layout", ["tree", "flat"])
@pytest.mark.parametrize("fmt,most", [("q8", 2.1), ("q4", 1.15), (None, 8.0)])
def test_state_bytes_per_param(layout, fmt, most):
  params = large_tree()
  n = sum(x.size for x in jax.tree.leaves(params))
  state = jadam.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt, layout=layout).init(params)
  per_param = (nbytes(adam_node(state).mu) + nbytes(adam_node(state).nu)) / n
  assert per_param <= most
  if fmt is not None:
    assert len(qarrays(state)) == 6
    plan = jadam.memory_plan(params, strategy="plain", n_devices=1, mu_dtype=fmt, nu_dtype=fmt)
    if layout == "tree":
      assert plan.opt_state == nbytes(state)


def test_small_leaves_keep_float32_moments():
  params = {"w": jnp.ones((64, 64)), "b": jnp.ones(4095), "v": jnp.ones((4096,), jnp.bfloat16)}
  for layout in ("tree", "flat"):
    state = adam_node(jadam.adam(1e-3, mu_dtype="q8", nu_dtype="q4", layout=layout).init(params))
    if layout == "tree":
      assert isinstance(state.mu["w"], jadam.QArray) and isinstance(state.nu["v"], jadam.QArray)
      assert state.mu["b"].dtype == jnp.float32 and state.nu["b"].shape == (4095,)
    else:
      kinds = {k: isinstance(v, jadam.QArray) for k, v in state.mu.items()}
      assert sorted(kinds.values()) == [False, True, True]
  custom = jadam.Quantized(bits=8, block_size=64, min_quantized_size=100)
  state = adam_node(jadam.adam(1e-3, nu_dtype=custom).init(params))
  assert isinstance(state.nu["b"], jadam.QArray) and state.nu["b"].codes.shape == (64, 64)
  assert state.mu["b"].dtype == jnp.float32 and state.nu["b"].fmt.signed is False


def test_amsgrad_nu_max_follows_nu():
  params = {"w": jnp.ones((64, 128))}
  state = adam_node(jadam.amsgrad(1e-3, mu_dtype="q8", nu_dtype="q4").init(params))
  assert state.mu["w"].fmt.bits == 8 and state.mu["w"].fmt.signed
  assert state.nu["w"].rank1 and state.nu_max["w"].rank1 and not state.nu_max["w"].fmt.signed


# ---------------------------------------------------- teacher-student regression


def mlp(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jnp.tanh(h @ p["w2"] + p["b2"])
  return h @ p["w3"]


def mlp_init(key, d=128, out=16):
  k = jax.random.split(key, 3)
  return {"w1": jax.random.normal(k[0], (d, d)) / np.sqrt(d), "b1": jnp.zeros(d),
          "w2": jax.random.normal(k[1], (d, d)) / np.sqrt(d), "b2": jnp.zeros(d),
          "w3": jax.random.normal(k[2], (d, out)) / np.sqrt(d)}


TEACHER = None


def regression(tx, steps=300, batch=256):
  """Validation loss of a student MLP (two 128 x 128 = 16384-element
  matrices) trained on minibatches of 16384 teacher samples."""
  teacher, student = mlp_init(jax.random.key(1)), mlp_init(jax.random.key(2))
  n = 16384
  x = jax.random.normal(jax.random.key(3), (n, 128))
  y = mlp(teacher, x)
  xv = jax.random.normal(jax.random.key(4), (2048, 128))
  yv = mlp(teacher, xv)
  loss = lambda p, x, y: jnp.mean((mlp(p, x) - y) ** 2)

  @jax.jit
  def step(p, s, i):
    xb = jax.lax.dynamic_slice_in_dim(x, (i * batch) % n, batch)
    yb = jax.lax.dynamic_slice_in_dim(y, (i * batch) % n, batch)
    u, s = tx.update(jax.grad(loss)(p, xb, yb), s, p)
    return optax.apply_updates(p, u), s

  p, s = student, tx.init(student)
  for i in range(steps):
    p, s = step(p, s, i)
  return float(loss(p, xv, yv)), p, s


@pytest.fixture(scope="module")
def float32_regression():
  return regression(optax.adam(1e-3))[0]


@pytest.mark.parametrize("fmt,within", [("q8", 0.02), ("q4", 0.04)])
def test_teacher_student_converges_like_float32_and_tree_equals_flat(
    float32_regression, fmt, within):
  tree_loss, tree_params, tree_state = regression(jadam.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt))
  flat_loss, flat_params, flat_state = regression(
      jadam.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt, layout="flat"))
  assert len(qarrays(tree_state)) == 4 and len(qarrays(flat_state)) == 4
  assert abs(tree_loss / float32_regression - 1) < within, (tree_loss, float32_regression)
  # The flat layout gives each quantized leaf its own buffer, quantized with
  # the tree layout's blocks (and rank-1 over its shape): the same numbers.
  chex.assert_trees_all_equal(flat_params, tree_params)
  assert flat_loss == tree_loss
  # ... and the same moments, decoded.
  layout = adam_node(flat_state).mu.layout
  for name in ("mu", "nu"):
    flat_m = layout.unpack({k: Q.decode(v) for k, v in getattr(adam_node(flat_state), name).items()})
    tree_m = jax.tree.map(Q.decode, getattr(adam_node(tree_state), name),
                          is_leaf=lambda x: isinstance(x, jadam.QArray))
    chex.assert_trees_all_equal(flat_m, tree_m)


# ------------------------------------------------------- jit, vmap, donation


def test_functional_api_jit_vmap_and_donation():
  params = {"w": jax.random.normal(jax.random.key(0), (4, 64, 128)), "b": jnp.ones((4, 8))}
  grads = jax.tree.map(lambda x: jnp.cos(x) * 0.1, params)

  def one(g, p):
    s = jadam.init(p, mu_dtype="q8", nu_dtype="q4")
    for _ in range(3):
      u, s = jadam.update(g, s, p, learning_rate=1e-2)
      p = optax.apply_updates(p, u)
    return p, s

  batched, batched_state = jax.vmap(one)(grads, params)
  assert isinstance(batched_state.mu["w"], jadam.QArray)
  for i in range(4):
    want, want_state = one(jax.tree.map(lambda x: x[i], grads), jax.tree.map(lambda x: x[i], params))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), want, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(batched_state.mu["w"].codes[i], want_state.mu["w"].codes)

  # Donated (params, state) give the same result as undonated ones.
  tx = jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q8")

  def train_step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p0 = {"w": params["w"][0]}
  g0 = {"w": grads["w"][0]}
  want = jax.jit(train_step)(p0, tx.init(p0), g0)
  donated = jax.jit(train_step, donate_argnums=(0, 1))
  state = tx.init(p0)
  got = donated(jax.tree.map(jnp.copy, p0), state, g0)
  chex.assert_trees_all_equal(got, want)
  assert adam_node(state).mu["w"].codes.is_deleted()


def test_eager_equals_jit():
  params = {"w": jax.random.normal(jax.random.key(0), (64, 128))}
  grads = jax.tree.map(jnp.sin, params)
  tx = jadam.adamw(1e-2, weight_decay=0.1, mu_dtype="q4", nu_dtype="q4")
  s = tx.init(params)
  chex.assert_trees_all_equal(tx.update(grads, s, params), jax.jit(tx.update)(grads, s, params))


# ------------------------------------------------------------ data parallel


def dp_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w1": jax.random.normal(k[0], (32, 256)) * 0.2, "b": jnp.zeros(256),
          "w2": jax.random.normal(k[1], (256, 16)) * 0.1}


def dp_loss(p, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"] - y) ** 2)


def dp_batches(n=4):
  k = jax.random.key(1)
  out = []
  for _ in range(n):
    k, a = jax.random.split(k)
    x = jax.random.normal(a, (48, 32))
    out.append((x, jnp.sin(x[:, :16])))
  return out


def assert_close_up_to_code_flips(got, want, steps=4, lr=1e-2):
  """Multi-device results against one device. The mean gradient differs in
  float32 ulps (another summation order), so a moment on a rounding
  boundary may take the neighbouring code: all but a few elements agree to
  1e-5, and none moves by more than the steps' learning rate."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    close = np.isclose(g, w, rtol=1e-5, atol=1e-6)
    assert close.mean() >= 0.999, close.mean()
    np.testing.assert_allclose(g, w, rtol=0, atol=steps * lr)


def run_trainer(strategy, n=8, layout="tree", fmt=("q8", "q8"), steps=4, mesh=None):
  mesh = mesh or jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  tx = jadam.adamw(1e-2, weight_decay=0.01, mu_dtype=fmt[0], nu_dtype=fmt[1])
  trainer = jadam.parallel.DataParallel(dp_loss, tx, mesh, strategy=strategy, layout=layout)
  params, state = trainer.init(dp_params())
  for batch in dp_batches(steps):
    params, state, loss = trainer.step(params, state, batch)
  return trainer, params, state


def one_device(fmt, layout, steps=4):
  tx = jadam.adamw(1e-2, weight_decay=0.01, mu_dtype=fmt[0], nu_dtype=fmt[1], layout=layout)
  p = dp_params()
  s = tx.init(p)
  for batch in dp_batches(steps):
    u, s = jax.jit(tx.update)(jax.grad(dp_loss)(p, batch), s, p)
    p = optax.apply_updates(p, u)
  return p


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("strategy,fmt", [("shard_map", ("q8", "q8")), ("pmap", ("q8", "q8")),
                                          ("jit", ("q4", "q4"))])
def test_replicated_strategies_match_one_device(strategy, fmt):
  want = one_device(fmt, "tree")
  trainer, params, state = run_trainer(strategy, fmt=fmt)
  assert qarrays(state)
  assert_close_up_to_code_flips(trainer.gather(params), want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("fmt", [("q8", "q8"), ("q4", "q4")])
def test_zero_matches_packed_flat_on_one_device(fmt):
  # ZeRO quantizes the global packed buffer in blocks that never cross a
  # device's slice: the same blocks as DataParallel(layout="flat") packing
  # the same buffer on one device (the padding differs, and holds zeros).
  one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  flat_trainer, flat_params, flat_state = run_trainer("shard_map", layout="flat", fmt=fmt,
                                                      mesh=one)
  want = flat_trainer.gather(flat_params)
  for strategy in ("zero1", "zero2"):
    trainer, params, state = run_trainer(strategy, fmt=fmt)
    # The bias (256 elements) has a float32-moment buffer of its own.
    assert sorted(adam_node(state).mu) == ["float32", "float32.small"]
    mu, small = adam_node(state).mu["float32"], adam_node(state).mu["float32.small"]
    assert isinstance(mu, jadam.QArray) and small.dtype == jnp.float32
    # Every device holds whole blocks of 1/8 of the buffer.
    assert mu.codes.addressable_shards[0].data.shape[0] == mu.codes.shape[0] // 8
    assert_close_up_to_code_flips(trainer.gather(params), want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_zero1_q8_bytes_per_device_and_plan():
  params = large_tree()
  n = sum(x.size for x in jax.tree.leaves(params))
  mesh = jax.make_mesh((8,), ("data",))
  for fmt in ("q8", "q4"):
    tx = jadam.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt)
    for strategy in ("zero1", "zero2"):
      trainer = jadam.parallel.DataParallel(lambda p, b: 0.0, tx, mesh, strategy=strategy)
      _, state = trainer.init(params)
      first = jax.devices()[0]
      device0 = sum(s.data.nbytes for x in jax.tree.leaves(state)
                    for s in x.addressable_shards if s.device == first)
      if fmt == "q8":
        assert device0 / n <= 0.27
      plan = jadam.memory_plan(params, strategy=strategy, n_devices=8, mu_dtype=fmt,
                               nu_dtype=fmt)
      assert plan.opt_state == device0
      assert jadam.memory_plan(params, strategy=strategy, n_devices=8, optimizer=tx) == plan


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_two_dimensional_mesh_with_model_sharded_params():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  params = dp_params()
  params["w1"] = jax.device_put(params["w1"], NamedSharding(mesh, P(None, "model")))
  params["w2"] = jax.device_put(params["w2"], NamedSharding(mesh, P("model", None)))
  want = one_device(("q8", "q8"), "tree")
  exact = one_device((None, None), "tree")
  gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want),
                                                          jax.tree.leaves(exact)))
  for strategy in ("zero1", "jit"):
    tx = jadam.adamw(1e-2, weight_decay=0.01, mu_dtype="q8", nu_dtype="q8")
    trainer = jadam.parallel.DataParallel(dp_loss, tx, mesh, strategy=strategy)
    p, s = trainer.init(params)
    assert qarrays(s)
    for batch in dp_batches(4):
      p, s, _ = trainer.step(p, s, batch)
    got = trainer.gather(p)
    if strategy == "jit":  # the tree state, each leaf quantized as on one device
      assert_close_up_to_code_flips(got, want)
      continue
    # ZeRO quantizes each model shard's slice of the buffer in its own
    # blocks: not the one-device blocks, so compare the distance from
    # float32 moments with the one-device q8 run's.
    dist = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got),
                                                            jax.tree.leaves(exact)))
    assert dist <= 2 * gap, (dist, gap)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("strategy", ["zero1", "shard_map"])
def test_checkpoint_restores_quantized_state_on_other_device_counts(tmp_path, strategy):
  trainer, params, state = run_trainer(strategy, fmt=("q8", "q4"), steps=3)
  want = trainer.gather((params, state))
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, params, state)
    ckpt.wait()
    for n in (8, 2, 6):
      mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
      tx = jadam.adamw(1e-2, weight_decay=0.01, mu_dtype="q8", nu_dtype="q4")
      other = jadam.parallel.DataParallel(dp_loss, tx, mesh, strategy=strategy)
      step, p, s = ckpt.restore(other)
      assert step == 3 and qarrays(s)
      # Codes and scales come back exactly (padding blocks aside).
      chex.assert_trees_all_equal(other.gather((p, s)), want, custom_message=f"{n} devices")


def test_tree_state_checkpoint_round_trip(tmp_path):
  import orbax.checkpoint as ocp
  params = dp_params()
  tx = jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q4")
  state = tx.init(params)
  u, state = tx.update(jax.tree.map(jnp.sin, params), state, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "s", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "s", jax.eval_shape(tx.init, params))
  chex.assert_trees_all_equal(restored, state)
  assert isinstance(adam_node(restored).nu["w1"], jadam.QArray)


# ------------------------------------------------------------------ bad input


def test_bad_formats_raise():
  with pytest.raises(ValueError, match=r"mu_dtype=...\)` must be None or a floating"):
    jadam.adam(1e-3, mu_dtype="q3")
  with pytest.raises(ValueError, match=r"Quantized\(bits=...\)` must be 4 or 8"):
    jadam.Quantized(bits=6)
  with pytest.raises(ValueError, match=r"block_size=...\)` must be a power of two"):
    jadam.Quantized(block_size=100)
  with pytest.raises(ValueError, match="quantized moments need real float params"):
    jadam.adam(1e-3, mu_dtype="q8").init({"z": jnp.ones(8192, jnp.complex64)})
  with pytest.raises(ValueError, match="for quantized moments pass them to the optimizer"):
    jadam.memory_plan({"w": jnp.ones(8)}, strategy="plain", n_devices=1,
                      optimizer=jadam.adam(1e-3), mu_dtype="q8")
  layout = jadam.FlatLayout.from_tree({"w": jnp.ones(5000)}, pad_multiple=100)
  with pytest.raises(ValueError, match="not a multiple of the quantized moments' block size"):
    jadam.init(layout.pack({"w": jnp.ones(5000)}), mu_dtype="q8")


def test_flax_nnx_optimizer_and_train_state():
  from flax import nnx
  from flax.training import train_state

  x = jax.random.normal(jax.random.key(0), (16, 64))
  y = jnp.sin(x[:, :4])
  tx = jadam.adamw(1e-2, weight_decay=0.01, mu_dtype="q8", nu_dtype="q4")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(64, 128, rngs=rngs)
      self.l2 = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  model = Model(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.as_pure(params0)
  loss = lambda m: jnp.mean((m(x) - y) ** 2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(3):
    nnx_step(model, optimizer)
  assert isinstance(nnx.as_pure(optimizer.opt_state)[0].mu["l1"]["kernel"], jadam.QArray)

  # The same steps on the pure params (what nnx.Optimizer hands the optimizer).
  pure_loss = lambda p: loss(nnx.merge(graphdef, p))
  state = train_state.TrainState.create(apply_fn=None, params=params0, tx=tx)
  for _ in range(3):
    state = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(pure_loss)(s.params)))(state)
  chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.Param)), state.params,
                              rtol=1e-6, atol=1e-7)
