"""``master_weights="float32" | "q8"`` for low-precision params: the q8
correction's round trip against float64; updates below a bfloat16 param's
last place accumulate instead of being lost; a teacher-student regression in
bfloat16 reaches the float32 params' loss (and without master weights does
not); tree, flat and ZeRO agree; the whole training state of bfloat16
params, gradients, q8 moments and a q8 master is at most 7.1 bytes per
parameter, measured from the arrays."""

from __future__ import annotations

import math
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jadam
import jadam.checkpoint
import jadam.parallel
from jadam import _master

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from plot_master import teacher_student  # noqa: E402  (the README's plot's runs)


def ulp64(p: np.ndarray) -> np.ndarray:
  """The spacing of ``p``'s dtype at ``|p|``, in float64, from its format's
  definition (normal: 2**(exponent - mantissa bits))."""
  info = ml_dtypes.finfo(p.dtype)
  a = np.abs(p.astype(np.float64))
  out = np.full(a.shape, float(info.smallest_subnormal))
  normal = a >= float(info.smallest_normal)
  out[normal] = 2.0 ** (np.floor(np.log2(a[normal])) - info.nmant)
  return out


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_q8_round_trip_against_float64(dtype):
  rng = np.random.default_rng(0)
  # Magnitudes of weights (1e-6 to 1e4) and edge values; not subnormals,
  # which XLA:CPU flushes to zero (as float32 arithmetic there does).
  master = np.concatenate([
      rng.normal(size=5000) * 10.0 ** rng.integers(-6, 4, 5000),
      [0.0, 1e-20, 1.0, -2.0, 65000.0 if dtype == jnp.float16 else 3e38]]
  ).astype(np.float32)
  for fmt in ("q8", "float32"):
    param = jnp.asarray(master).astype(dtype)
    state = _master.residual(fmt, jnp.asarray(master), param)
    got = np.asarray(_master.decode(state, param), np.float64)
    p = np.asarray(param)
    np.testing.assert_array_equal(p, master.astype(dtype))  # the param: one rounding
    if fmt == "float32":
      np.testing.assert_array_equal(got, master)  # exact
      continue
    assert np.asarray(state).dtype == np.int8
    err = np.abs(got - master.astype(np.float64))
    finite = np.isfinite(p.astype(np.float64))
    # Within 1/256 of the param's last place (float32's own rounding of the
    # decoded value aside).
    bound = ulp64(p) / 256 + np.abs(master.astype(np.float64)) * 2.0**-24
    assert np.all(err[finite] <= bound[finite]), np.max((err / bound)[finite])
    # And far better than the param alone where the rounding lost something.
    lost = np.abs(p.astype(np.float64) - master)
    big = finite & (lost > ulp64(p) / 8)
    assert np.all(err[big] < lost[big] / 16)


@pytest.mark.parametrize("master", [None, "float32", "q8"])
def test_small_updates_accumulate(master):
  # lr 1e-4 on params of 1: each update is 1/80 of bfloat16's last place
  # (2**-7): rounded away without master weights, summed with them.
  tx = jadam.adam(1e-4, master_weights=master)
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  state = tx.init(params)
  step = jax.jit(lambda p, s: _apply(tx, {"w": jnp.ones((4,), jnp.bfloat16)}, s, p))
  for _ in range(200):
    params, state = step(params, state)
  w = np.asarray(params["w"], np.float64)
  if master is None:
    np.testing.assert_array_equal(w, 1.0)  # every update lost
  else:
    # 200 steps of -1e-4: 0.98, to within bfloat16's rounding of it.
    np.testing.assert_allclose(w, 1.0 - 200 * 1e-4, atol=2.0**-8)
    assert np.all(w < 1.0)


def _apply(tx, grads, state, params):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_teacher_student_in_bfloat16_reaches_float32():
  final = lambda *args, **kw: float(np.mean(teacher_student(*args, **kw)[-20:]))
  float32 = final(jnp.float32, None)
  bare = final(jnp.bfloat16, None)
  q8 = final(jnp.bfloat16, "q8")
  full = final(jnp.bfloat16, "float32", layout="flat")
  assert abs(q8 / float32 - 1) <= 0.01, (q8, float32)
  assert abs(full / float32 - 1) <= 0.01, (full, float32)
  assert bare > 1.05 * float32, (bare, float32)  # the gap master weights close


def test_zero_shards_the_master_and_matches_one_device(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16),
            "b": jnp.zeros((32,), jnp.bfloat16)}
  batches = [{"x": rng.normal(size=(16, 64)).astype(np.float32),
              "y": rng.normal(size=(16, 32)).astype(np.float32)} for _ in range(5)]
  loss_fn = lambda p, b: jnp.mean(
      ((b["x"].astype(jnp.bfloat16) @ p["w"] + p["b"]).astype(jnp.float32) - b["y"]) ** 2)
  tx = jadam.adamw(1e-4, weight_decay=0.1, master_weights="q8")
  out = {}
  for strategy in ("shard_map", "zero2"):
    trainer = jadam.parallel.DataParallel(loss_fn, tx, jax.make_mesh((8,), ("data",)),
                                          strategy=strategy)
    p, s = trainer.init(params)
    for b in batches:
      p, s, _ = trainer.step(p, s, b)
    out[strategy] = trainer.gather((p, s))
    if strategy == "zero2":  # the correction split like the moments
      leaf = s.master["bfloat16"]
      assert leaf.dtype == jnp.int8
      assert leaf.addressable_shards[0].data.size * 8 == leaf.size
      # ... and restored onto 4 devices (re-padded like the moments).
      with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, p, s)
        ckpt.wait()
        four = jadam.parallel.DataParallel(
            loss_fn, tx, jax.make_mesh((4,), ("data",), devices=jax.devices()[:4]),
            strategy="zero2")
        _, p4, s4 = ckpt.restore(four)
      chex.assert_trees_all_equal(four.gather((p4, s4)), out["zero2"])
  want = out["shard_map"]
  got = out["zero2"]
  chex.assert_trees_all_close(got[0], want[0], rtol=0, atol=float(2.0**-7))
  # The master values agree (the params may round a last bit apart).
  master = lambda params, state: jax.tree.map(
      lambda p, m: np.asarray(_master.decode(jnp.asarray(m), jnp.asarray(p))), params,
      state.master)
  chex.assert_trees_all_close(master(*got), master(*want), rtol=1e-5, atol=1e-6)


def test_lean_state_is_at_most_7_1_bytes_per_param():
  params = {"w": jnp.zeros((1024, 1024), jnp.bfloat16), "v": jnp.zeros((512, 256), jnp.bfloat16)}
  tx = jadam.adamw(1e-3, mu_dtype="q8", nu_dtype="q8", master_weights="q8")
  state = tx.init(params)
  grads = jax.grad(lambda p: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p)))(
      params)
  n = sum(x.size for x in jax.tree.leaves(params))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  total = nbytes(params) + nbytes(grads) + nbytes(state)
  assert nbytes(grads) == 2 * n
  assert total / n <= 7.1, total / n
  plan = jadam.memory_plan(params, strategy="plain", n_devices=1, optimizer=tx)
  assert plan.params + plan.grads + plan.opt_state == total


def test_a_param_crossing_zero_lands_on_the_master_value():
  # bfloat16 1.0078 to -0.00293: the change is not a bfloat16 number, so the
  # update is float32 and optax.apply_updates lands on the master value.
  param = jnp.asarray([1.0078125], jnp.bfloat16)
  master = jnp.asarray([-0.00293], jnp.float32)
  for fmt in ("float32", "q8"):
    update, state = _master.step(fmt, master, param)
    assert update.dtype == jnp.float32
    new = optax.apply_updates(param, update)
    assert new.dtype == jnp.bfloat16 and new[0] == master.astype(jnp.bfloat16)[0]
    decoded = float(_master.decode(state, new)[0])
    assert abs(decoded - float(master[0])) <= float(_master.ulp(new)[0]) / 256
  tx = jadam.adam(1e-3, master_weights="q8")
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  updates, _ = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, tx.init(params), params)
  assert updates["w"].dtype == jnp.float32


def test_local_steps_restart_the_master_with_the_replicas():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  params = {"w": jnp.ones((16, 8), jnp.bfloat16)}
  batch = {"x": np.ones((16, 16), np.float32)}
  loss_fn = lambda p, b: jnp.mean((b["x"].astype(jnp.bfloat16) @ p["w"]).astype(jnp.float32) ** 2)
  trainer = jadam.parallel.DataParallel(
      loss_fn, jadam.adam(1e-4, master_weights="q8"), jax.make_mesh((8,), ("data",)),
      strategy=jadam.parallel.LocalSteps(inner_steps=2))
  p, s = trainer.init(params)
  p, s, _ = trainer.step(p, s, batch)
  assert np.any(np.asarray(s.inner.master["w"]))  # an inner step: kept below the last place
  p, s, _ = trainer.step(p, s, batch)
  assert not np.any(np.asarray(s.inner.master["w"]))  # the outer step: restarted


@pytest.mark.parametrize("master", ["float32", "q8"])
@pytest.mark.parametrize("packed", [False, True])
def test_functional_step_keeps_the_master_in_its_state(master, packed):
  """``jadam.init(params, master_weights=...)`` then ``jadam.step`` (tree or
  packed bfloat16 params; the XLA path, and the kernel where it is built):
  the optimizer's math (``jadam.adamw`` with the same master weights, its
  update applied by ``optax.apply_updates``), bit for bit on XLA's ops, to
  float32 rounding on the kernel."""
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=(40, 30)), jnp.bfloat16),
            "b": jnp.asarray(rng.normal(size=(30,)), jnp.bfloat16)}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
           for _ in range(30)]
  kw = dict(learning_rate=2e-5, weight_decay=1e-2)  # far below most params' last place
  tx = jadam.adamw(kw["learning_rate"], weight_decay=kw["weight_decay"], master_weights=master,
                   kernel="xla")
  p_ref, s_ref = params, tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, s_ref = update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  layout = jadam.FlatLayout.from_tree(params)
  wrap = layout.pack if packed else (lambda t: t)
  unwrap = layout.unpack if packed else (lambda t: t)
  kernels = ["xla"] + (["fused"] if jadam._kernel.available() else [])  # pylint: disable=protected-access
  for kernel in kernels:
    step = jax.jit(lambda g, s, p, k=kernel: jadam.step(g, s, p, kernel=k, **kw))
    p = wrap(params)
    s = jadam.init(p, master_weights=master)
    assert type(s).__name__ == "AdamMasterState"
    for g in grads:
      p, s = step(wrap(g), s, p)
    for a, b in zip(jax.tree.leaves(unwrap(p)), jax.tree.leaves(p_ref)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      if kernel == "xla":
        np.testing.assert_array_equal(a, b)
      else:  # float32 rounding: a master value on a rounding tie can land either way
        assert np.mean(a != b) < 1e-2
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=0)
    assert np.any(np.asarray(unwrap(p)["w"]) != np.asarray(params["w"]))
  assert int(s.count) == len(grads)


def test_bad_master_weights():
  with pytest.raises(ValueError, match=r"master_weights=...\)` must be None, 'float32' or 'q8'"):
    jadam.adam(1e-3, master_weights="q4")
  tx = jadam.adam(1e-3, master_weights="q8")
  state = tx.init({"w": jnp.ones(3, jnp.bfloat16)})
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update({"w": jnp.ones(3, jnp.bfloat16)}, state)
  assert math.isclose(float(_master.ulp(jnp.asarray(1.0, jnp.bfloat16))), 2.0**-7)
  with pytest.raises(ValueError, match="master weights take the optimizer's whole update"):
    jadam.scale_by_adam(master_weights="q8")
  with pytest.raises(ValueError, match=r"needs real float params; the param at \['w'\]"):
    tx.init({"w": jnp.ones(3, jnp.complex64)})
  with pytest.raises(ValueError, match=r"`jadam.init\(master_weights=...\)` must be None"):
    jadam.init({"w": jnp.ones(3, jnp.bfloat16)}, master_weights="bf16")
  state = jadam.init({"w": jnp.ones(3, jnp.bfloat16)}, master_weights="q8")
  bad = state._replace(master={"w": jnp.zeros(3, jnp.int16)})
  with pytest.raises(ValueError, match=r"`state.master` must hold float32 .* got \['int16'\]"):
    jadam.step({"w": jnp.ones(3, jnp.bfloat16)}, bad, {"w": jnp.ones(3, jnp.bfloat16)})
  with pytest.raises(ValueError, match=r"memory_plan\(master_weights=...\)` must be"):
    jadam.memory_plan({"w": jnp.ones(3)}, strategy="plain", n_devices=1, master_weights="fp32")
