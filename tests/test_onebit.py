"""``strategy=jadam.parallel.OneBit(warmup_steps=W)`` (1-bit Adam) on 8 fake
CPU devices: the exchange and the whole algorithm against a NumPy reference
(error feedback on both sides, frozen ``nu``); the warm-up equals
``"shard_map"`` bit for bit; the layouts agree; bytes per step from the
compiled HLO; checkpoints; bad options."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jadam
import jadam.checkpoint
import jadam.parallel
from jadam import _rule
from jadam.parallel import _sign_exchange as sx
from test_parallel import init_params
from test_parallel import make_batches
from test_parallel import mse
from test_parallel import run_trainer

N = 8
WARMUP = 4
STEPS = 10
LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def setup_module():
  if jax.device_count() < N:
    pytest.skip("needs 8 devices", allow_module_level=True)


def mesh():
  return jax.make_mesh((N,), ("data",))


def run(optimizer, strategy, steps=STEPS, *, layout="tree"):
  trainer = jadam.parallel.DataParallel(mse, optimizer, mesh(), strategy=strategy,
                                        layout=layout)
  return (trainer, *run_trainer(trainer, steps))


# ------------------------------------------------------------ NumPy reference


def np_compress(x: np.ndarray, count: int) -> np.ndarray:
  """One chunk, 1-bit: sign (0 counts as +) times |x|_2 / sqrt(count)."""
  scale = np.sqrt(np.sum(x[:count] ** 2, dtype=np.float32)) / np.float32(np.sqrt(max(count, 1)))
  out = np.where(x >= 0, scale, -scale).astype(np.float32)
  out[count:] = 0
  return out


def np_exchange(ms, worker_errors, server_errors, size):
  """1-bit Adam's compressed all-reduce over len(ms) workers."""
  n = len(ms)
  c = len(ms[0]) // n
  counts = [int(np.clip(size - k * c, 0, c)) for k in range(n)]
  sent, new_worker = [], []
  for m, e in zip(ms, worker_errors):
    x = m + e
    approx = np.concatenate([np_compress(x[k * c:(k + 1) * c], counts[k]) for k in range(n)])
    sent.append(approx)
    new_worker.append(x - approx)
  mean, new_server = np.zeros_like(ms[0]), []
  for j in range(n):
    x = np.mean([s[j * c:(j + 1) * c] for s in sent], axis=0) + server_errors[j]
    approx = np_compress(x, counts[j])
    new_server.append(x - approx)
    mean[j * c:(j + 1) * c] = approx
  return mean, new_worker, new_server


def ravel(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float32)


def unravel(vec, like):
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for x in leaves:
    out.append(vec[start:start + x.size].reshape(x.shape))
    start += x.size
  return jax.tree.unflatten(treedef, out)


def bias_correction(b, t):
  """``1 - b**t`` as jadam computes it, bit for bit as optax does (in
  float32, with XLA's ``pow``: a relative 1e-5 off at small t, far above
  float32's epsilon, so a float64 reference must use the same value)."""
  hp = _rule.Hyper(LR, b, b, EPS, 0.0, 0.0)
  return np.float32(_rule.step_scalars(_rule.Rule(), hp, jnp.asarray(t, jnp.int32)).bc_mu)


def np_onebit_adam(steps, warmup):
  """1-bit Adam (Tang et al. 2021, Algorithm 1) in NumPy float32: Adam on
  the mean gradient for ``warmup`` steps, then nu frozen and the workers'
  momenta averaged by the compressed exchange with error feedback. The
  per-worker gradients (of its share of each batch) come from jax.grad."""
  params = init_params()
  p = ravel(params)
  size = p.size
  padded = sx.padded_size(size, N)
  m, v = np.zeros(size, np.float32), np.zeros(size, np.float32)
  we = [np.zeros(padded, np.float32) for _ in range(N)]
  se = [np.zeros(padded // N, np.float32) for _ in range(N)]
  grad = jax.jit(jax.grad(mse))
  for t, batch in enumerate(make_batches(steps), 1):
    share = len(batch["x"]) // N
    gs = [ravel(grad(unravel(p, params), jax.tree.map(
        lambda x: x[i * share:(i + 1) * share], batch))) for i in range(N)]
    if t <= warmup:
      g = np.mean(gs, axis=0)
      m = (1 - B1) * g + B1 * m
      v = (1 - B2) * g * g + B2 * v
      bc_nu = bias_correction(B2, t)
    else:
      local = [np.pad((1 - B1) * g + B1 * m, (0, padded - size)) for g in gs]
      mean, we, se = np_exchange(local, we, se, size)
      m = mean[:size]
      bc_nu = bias_correction(B2, warmup)
    p = p - LR * (m / bias_correction(B1, t)) / (np.sqrt(v / bc_nu) + EPS)
  return unravel(p, params), m, v, we, se


# ---------------------------------------------------------------------- tests


def test_exchange_matches_numpy_reference():
  size = 1000  # not a multiple of 8 N: the last chunks hold padding
  padded = sx.padded_size(size, N)
  assert padded == 1024
  rng = np.random.default_rng(0)

  def per_device(m, we, se):
    mean, we, se = sx.compressed_mean(m[0], we[0], se[0], "data", size, N)
    return mean[None], we[None], se[None]

  split = jax.sharding.NamedSharding(mesh(), P("data"))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh(), in_specs=P("data"),
                                  out_specs=P("data"), check_vma=False))
  exchange = lambda *xs: sharded(*(jax.device_put(x, split) for x in xs))
  we = np.zeros((N, padded), np.float32)
  se = np.zeros((N, padded // N), np.float32)
  want_we, want_se = list(we), list(se)
  for _ in range(3):  # the error feedback of one round enters the next
    ms = rng.normal(size=(N, size)).astype(np.float32) * rng.uniform(0.1, 3, (N, 1))
    ms = np.pad(ms, ((0, 0), (0, padded - size))).astype(np.float32)
    mean, we, se = (np.asarray(x) for x in exchange(ms, we, se))
    want, want_we, want_se = np_exchange(list(ms), want_we, want_se, size)
    for d in range(N):  # every device gets the same mean
      np.testing.assert_allclose(mean[d], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(we, np.stack(want_we), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(se, np.stack(want_se), rtol=1e-5, atol=1e-6)
  assert not np.any(we[:, size:]) and not np.any(mean[:, size:])  # padding stays zero


def test_matches_numpy_one_bit_adam():
  trainer, params, state, _ = run(jadam.adam(LR), jadam.parallel.OneBit(WARMUP))
  want_p, want_m, want_v, want_we, want_se = np_onebit_adam(STEPS, WARMUP)
  got = trainer.gather(state)
  assert int(got.count) == STEPS and int(got.inner[0].count) == STEPS
  chex.assert_trees_all_close(trainer.gather(params), want_p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ravel(got.inner[0].mu), want_m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ravel(got.inner[0].nu), want_v, rtol=1e-5, atol=0)
  np.testing.assert_allclose(got.worker_error, np.stack(want_we), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.server_error, np.stack(want_se), rtol=1e-4, atol=1e-6)


def test_warmup_is_shard_map_bit_for_bit():
  _, params, state, losses = run(jadam.adamw(LR, eps=1.0), jadam.parallel.OneBit(6), 6)
  ref = jadam.parallel.DataParallel(mse, jadam.adamw(LR, eps=1.0), mesh(),
                                    strategy="shard_map")
  ref_params, ref_state = ref.init(init_params())
  ref_losses = []
  for batch in make_batches(6):
    ref_params, ref_state, loss = ref.step(ref_params, ref_state, batch)
    ref_losses.append(float(loss))
  chex.assert_trees_all_equal(ref.gather((ref_params, ref_state)),
                              ref.gather((params, state.inner)))
  assert list(losses) == ref_losses
  assert not np.any(np.asarray(state.worker_error))


@pytest.mark.parametrize("name,make", [
    ("nadamw", lambda: jadam.nadamw(LR, weight_decay=1e-2)),
    ("radam", lambda: jadam.radam(LR)),
    ("amsgrad", lambda: jadam.amsgrad(LR)),
    ("adamax", lambda: jadam.adamax(LR)),
    ("lamb", lambda: jadam.lamb(LR)),
    ("adam_q8", lambda: jadam.adam(LR, mu_dtype="q8", nu_dtype="q8")),
])
def test_every_optimizer_freezes_nu_and_trains(name, make):
  # nu (and amsgrad's nu_max) keep their values of the last warm-up step;
  # the loss stays within reach of exact Adam's.
  trainer = jadam.parallel.DataParallel(mse, make(), mesh(),
                                        strategy=jadam.parallel.OneBit(WARMUP))
  params, state = trainer.init(init_params())
  losses = []
  for t, batch in enumerate(make_batches(STEPS), 1):
    params, state, loss = trainer.step(params, state, batch)
    losses.append(float(loss))
    if t == WARMUP:
      warm = trainer.gather(state.inner)
  inner = trainer.gather(state.inner)
  for field in ("nu", "nu_max"):
    got = optax.tree.get(inner, field, None)
    if got is not None:
      chex.assert_trees_all_equal(got, optax.tree.get(warm, field))
  assert any(not np.array_equal(a, b) for a, b in zip(  # mu moved on
      jax.tree.leaves(optax.tree.get(inner, "mu")), jax.tree.leaves(optax.tree.get(warm, "mu"))))
  _, _, _, ref_losses = run(make(), "shard_map", STEPS)
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 1.5 * np.mean(ref_losses[-3:]), (losses, ref_losses)


def test_tree_flat_and_packed_layouts_agree():
  opts = jadam.parallel.OneBit(WARMUP)
  tree = run(jadam.adam(LR), opts)
  flat = run(jadam.adam(LR, layout="flat"), opts)
  packed = run(jadam.adam(LR), opts, layout="flat")
  # Within float32 rounding: the layouts' warm-up steps (as "shard_map"'s)
  # already differ in the last bits.
  want = tree[0].gather((tree[1], tree[2].worker_error))
  for other in (flat, packed):
    chex.assert_trees_all_close(other[0].gather((other[1], other[2].worker_error)), want,
                                rtol=1e-5, atol=1e-7)


def test_bytes_after_warmup_are_at_most_one_sixteenth_of_shard_map():
  params = {"w": np.zeros((64, 64), np.float32), "b": np.zeros((64,), np.float32)}
  batch = {"x": np.ones((16, 64), np.float32), "y": np.ones((16, 64), np.float32)}
  loss = lambda p, b: jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)
  plain = jadam.parallel.DataParallel(loss, jadam.adam(LR), mesh(), strategy="shard_map")
  p, s = plain.init(params)
  plain_bytes = jadam.parallel.comm_bytes(plain, p, s, batch)
  trainer = jadam.parallel.DataParallel(loss, jadam.adam(LR), mesh(),
                                        strategy=jadam.parallel.OneBit(1))
  p, s = trainer.init(params)
  assert jadam.parallel.comm_bytes(trainer, p, s, batch) == plain_bytes  # warm-up
  p, s, _ = trainer.step(p, s, batch)
  report = jadam.parallel.comm_report(trainer, p, s, batch)
  size = 64 * 65
  padded = sx.padded_size(size, N)
  # Signs and a 4-byte scale per chunk, all-to-all then all-gather, and the
  # loss's scalar all-reduce.
  signs = 2 * (N - 1) / N * (padded // 8 + 4 * N)
  assert report.by_kind == {"all-to-all": signs / 2, "all-gather": signs / 2,
                            "all-reduce": 7}
  assert report.bytes_per_device <= plain_bytes / 16
  print(f"1-bit / shard_map bytes: {report.bytes_per_device / plain_bytes:.4f}")


def test_checkpoint_round_trip(tmp_path):
  opts = jadam.parallel.OneBit(WARMUP)
  trainer, params, state, _ = run(jadam.adam(LR), opts, 6)
  want = trainer.gather((params, state))
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(6, params, state)
    ckpt.wait()
    other = jadam.parallel.DataParallel(mse, jadam.adam(LR), mesh(), strategy=opts)
    step, p, s = ckpt.restore(other)
  assert step == 6
  chex.assert_trees_all_equal(other.gather((p, s)), want)
  assert np.any(want[1].worker_error)  # the error feedback was saved
  for batch in make_batches(3):
    params, state, _ = trainer.step(params, state, batch)
    p, s, _ = other.step(p, s, batch)
  chex.assert_trees_all_equal(other.gather((p, s)), trainer.gather((params, state)))


def test_frozen_rule_matches_float64():
  # The element rule with nu frozen at step 3, at step 7, for every kind.
  rng = np.random.default_rng(0)
  g, mu, nu = (rng.normal(size=50).astype(np.float32) for _ in range(3))
  nu = np.abs(nu)
  nu_max = nu * 1.5
  hp = _rule.Hyper(LR, B1, B2, EPS, 0.0, 0.0)
  t, w = 7, 3
  for kind, nesterov in (("adam", False), ("adam", True), ("radam", False),
                         ("amsgrad", False), ("adamax", False)):
    rule = _rule.Rule(kind, nesterov=nesterov, nu_frozen_at=w)
    moments = (mu, nu, nu_max) if kind == "amsgrad" else (mu, nu)
    scalars = _rule.step_scalars(rule, hp, jnp.asarray(t, jnp.int32))
    direction, new = _rule.element_update(rule, hp, scalars, jnp.asarray(g),
                                          tuple(map(jnp.asarray, moments)))
    g64, mu64, nu64 = (x.astype(np.float64) for x in (g, mu, nu))
    bc = lambda b, t: np.float64(bias_correction(b, t))
    m = (1 - B1) * g64 + B1 * mu64
    if kind == "adamax":
      want = m / bc(B1, t) / nu64
    else:
      m_hat = m / bc(B1, t)
      if nesterov:
        m_hat = B1 * m / bc(B1, t + 1) + (1 - B1) * g64 / bc(B1, t)
      v_hat = nu64 / bc(B2, w)
      if kind == "amsgrad":
        v_hat = np.maximum(nu_max.astype(np.float64), v_hat)
      want = m_hat / (np.sqrt(v_hat) + EPS)
      if kind == "radam":
        ro_inf = 2 / (1 - B2) - 1
        ro = ro_inf - 2 * w * B2**w / (1 - B2**w)
        assert ro < 5.0  # not rectified yet at step 3: the plain momentum
        want = m_hat
    np.testing.assert_allclose(direction, want, rtol=2e-6, err_msg=f"{kind} {nesterov}")
    np.testing.assert_array_equal(new[1], nu)  # frozen
    np.testing.assert_allclose(new[0], m, rtol=1e-6)


def test_named_strategy_and_bad_options():
  trainer = jadam.parallel.DataParallel(mse, jadam.adam(LR), mesh(), strategy="onebit")
  assert trainer.strategy == "onebit"
  assert trainer._strategy.options.warmup_steps == 1000  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"OneBit\(warmup_steps=...\)` must be a positive"):
    jadam.parallel.OneBit(0)
  with pytest.raises(ValueError, match="needs one jadam optimizer"):
    jadam.parallel.DataParallel(mse, optax.adam(LR), mesh(), strategy="onebit")
  # A wrapper that skips on each device's own gradient would split the devices.
  with pytest.raises(ValueError, match=r"got apply_if_finite \(for skipping non-finite"):
    jadam.parallel.DataParallel(mse, optax.apply_if_finite(jadam.adam(LR), 3), mesh(),
                                strategy="onebit")
  assert type(jadam.parallel.OneBit(np.int64(5)).warmup_steps) is int


# ------------------------------------------------------------ the fused kernel


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_kernel_runs_the_frozen_steps(monkeypatch, layout):
  """``OneBit`` with ``kernel="fused"``: the steps after the warm-up run the
  kernel with ``nu`` frozen, and the run agrees with XLA's ops to float32
  rounding (as the layouts do). (The kernel's frozen rule against NumPy's:
  tests/test_kernel.py.)"""
  from jadam import _kernel  # pylint: disable=import-outside-toplevel
  from jadam._kernel import _ffi  # pylint: disable=import-outside-toplevel
  if not _kernel.available():
    pytest.skip("the fused kernel is not built here (no C++ compiler)")
  traced = []
  real = _ffi.step
  monkeypatch.setattr(_ffi, "step", lambda *a, **kw: traced.append(kw["frozen_nu"]) or real(*a, **kw))
  opts = jadam.parallel.OneBit(WARMUP)
  fused = run(jadam.adamw(LR, weight_decay=1e-2, layout=layout, kernel="fused"), opts)
  assert True in traced and False in traced  # the frozen steps and the warm-up's
  xla = run(jadam.adamw(LR, weight_decay=1e-2, layout=layout, kernel="xla"), opts)
  chex.assert_trees_all_close(fused[0].gather((fused[1], fused[2].worker_error)),
                              xla[0].gather((xla[1], xla[2].worker_error)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fused[3], xla[3], rtol=1e-5)
