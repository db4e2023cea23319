"""Static layouts travel with their values (issue 9): no cache keyed by tree
structure, no "last seen" layout; a query never mutates the trainer.

Each test here reproduces a bug of the layout-in-a-closure design first."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
import jadam.parallel
from _trees import side_by_side

NUM_DEVICES = 8


def bf16_params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16),
          "b": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}


def f32_grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


@pytest.mark.parametrize("name", ["adam", "amsgrad"])
def test_flat_update_by_an_optimizer_whose_init_never_ran(name):
  """Bug: the flat optimizer looked its layout up in a closure dict filled by
  its own init, so a rebuilt optimizer (same arguments) could not update
  bfloat16 params' state from float32 gradients without params."""
  params = bf16_params()
  make = getattr(jadam, name)
  state = make(1e-2, layout="flat").init(params)
  grads = f32_grads(params)
  fresh = make(1e-2, layout="flat")  # built anew: its init never ran
  updates, new_state = fresh.update(grads, state)
  # One step from zero moments: the update depends on float32 values only, so
  # it is optax's in float32 (to the flat layout's occasional reciprocal-versus-
  # division ulp, see test_flat.py), and the stored moments are optax's
  # rounded once to bfloat16.
  ref_tx = getattr(optax, name)(1e-2)
  f32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  ref_updates, ref_state = jax.jit(ref_tx.update)(grads, ref_tx.init(f32))
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, ref_updates)
  chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6, atol=0)
  layout = new_state[0].mu.layout
  assert isinstance(layout, jadam.FlatLayout)
  got_mu = layout.unpack(new_state[0].mu)
  chex.assert_trees_all_equal(
      got_mu, jax.tree.map(lambda m: m.astype(jnp.bfloat16), ref_state[0].mu))


def test_flat_state_survives_inject_hyperparams_and_a_restore(tmp_path):
  """inject_hyperparams rebuilds the optimizer at every call; a restored state
  (orbax, into a target made by init) updates in a new optimizer object."""
  import orbax.checkpoint as ocp

  params = jax.tree.map(lambda p: p.astype(jnp.float32), bf16_params())
  tx = optax.inject_hyperparams(jadam.adamw, static_args=("layout",))(
      learning_rate=1e-2, weight_decay=0.1, layout="flat")
  ref = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
  p, state, rp, _ = side_by_side(tx, ref, params, lambda t: f32_grads(params, t), 3)
  chex.assert_trees_all_close(p, rp, rtol=1e-6, atol=0)

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  target = jax.eval_shape(tx.init, params)
  restored = ckpt.restore(tmp_path / "state", target)
  assert restored.inner_state[0].mu.layout == state.inner_state[0].mu.layout
  g = f32_grads(params, 9)
  u1, _ = optax.inject_hyperparams(jadam.adamw, static_args=("layout",))(
      learning_rate=1e-2, weight_decay=0.1, layout="flat").update(g, restored, p)
  u2, _ = tx.update(g, state, p)
  chex.assert_trees_all_equal(u1, u2)


def _mse(params, batch):
  pred = batch["x"] @ params["w"]
  return jnp.mean((pred.sum(-1) - batch["y"]) ** 2)


def _batch(rows, features):
  rng = np.random.default_rng(2)
  return {"x": rng.normal(size=(rows, features)).astype(np.float32),
          "y": rng.normal(size=(rows,)).astype(np.float32)}


@pytest.mark.parametrize("strategy", ["shard_map", "jit", "pmap"])
def test_flat_trainer_gathers_each_model_with_its_own_layout(strategy):
  """Bug: DataParallel(layout="flat") kept the layout of the last init, so
  after init of a second model of the same tree structure, gather(old
  params) silently returned the second model's (4, 3) shape for a (3, 4)
  param; and the step was rebuilt for it."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  trainer = jadam.parallel.DataParallel(_mse, jadam.adam(1e-2), mesh, strategy=strategy,
                                        layout="flat")
  a = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
  b = {"w": np.ones((4, 3), np.float32)}
  params_a, state_a = trainer.init(a)
  template_a = trainer.params_template
  trainer.abstract_state(b)  # a query: must not change what init recorded
  assert trainer.params_template is template_a
  params_b, _ = trainer.init(b)
  got = trainer.gather(params_a)
  assert got["w"].shape == (3, 4)
  np.testing.assert_array_equal(got["w"], a["w"])
  assert trainer.gather(state_a)[0].mu["w"].shape == (3, 4)
  assert trainer.gather(params_b)["w"].shape == (4, 3)
  # Both models still step, each in its own layout.
  params_a, state_a, _ = trainer.step(params_a, state_a, _batch(8, 3))
  assert trainer.gather(params_a)["w"].shape == (3, 4)


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero_gathers_each_state_with_its_own_layout(strategy):
  """ZeRO remembered the layout of the last params seen: the moments of an
  earlier model came back in the later model's shapes."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  trainer = jadam.parallel.DataParallel(_mse, jadam.adam(1e-2), mesh, strategy=strategy)
  a = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
  b = {"w": np.ones((4, 3), np.float32)}
  params_a, state_a = trainer.init(a)
  params_a, state_a, _ = trainer.step(params_a, state_a, _batch(8, 3))
  before = trainer.gather(state_a)
  params_b, state_b = trainer.init(b)
  trainer.abstract_state({"w": np.ones((5, 2), np.float32)})
  after = trainer.gather(state_a)
  assert after[0].mu["w"].shape == (3, 4)
  chex.assert_trees_all_equal(after, before)
  assert trainer.gather(state_b)[0].mu["w"].shape == (4, 3)
  with pytest.raises(ValueError, match="must be the zero. state of these params"):
    trainer.step(params_a, state_b, _batch(8, 3))


_FRESH_PROCESS = r"""
import sys, numpy as np, jax, jax.numpy as jnp, optax, orbax.checkpoint as ocp, jadam
path, mode = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16)}
grads = lambda t: jax.tree.map(lambda p: jnp.asarray(
    np.random.default_rng(t).normal(size=p.shape), jnp.float32), params)
make = lambda: jadam.amsgrad(1e-2, layout="flat")
ckpt = ocp.StandardCheckpointer()
if mode == "save":
  tx = make()
  state = tx.init(params)
  for t in range(3):
    _, state = tx.update(grads(t), state)
  ckpt.save(path + "/state", state)
  ckpt.wait_until_finished()
else:  # a fresh process: the target from one optimizer object, the update by another
  state = ckpt.restore(path + "/state", jax.eval_shape(make().init, params))
# float32 gradients of bfloat16 params, without the params.
updates, _ = make().update(grads(3), state)
np.savez(path + "/" + mode + ".npz", **{k: np.asarray(v, np.float32) for k, v in updates.items()})
"""


def test_flat_state_restores_in_a_fresh_process(tmp_path):
  """A layout='flat' state saved by one process updates in another that has
  only the optimizer's arguments and the params: the layout comes back with
  the state (a restore target from init), nothing is cached in a closure."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  for mode in ("save", "restore"):
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path), mode],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
  saved, restored = np.load(tmp_path / "save.npz"), np.load(tmp_path / "restore.npz")
  for k in saved:
    np.testing.assert_array_equal(restored[k], saved[k])


def test_flat_trainer_abstract_state_is_what_init_makes():
  """abstract_state of tree params lays them out as init does (packed), so a
  checkpoint restore target matches the real state."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  trainer = jadam.parallel.DataParallel(_mse, jadam.adam(1e-2), mesh, layout="flat")
  tree = {"w": np.ones((3, 4), np.float32)}
  abstract = trainer.abstract_state(tree)
  real = trainer.init(tree)
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, real)
