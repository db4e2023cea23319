"""``strategy="fsdp"`` (ZeRO-3) on 8 fake CPU devices against a single-device,
full-batch run of the same optimizer: params, moments and losses; the bytes
each device holds (``addressable_shards``) and sends (the compiled HLO);
``memory_plan``; checkpoints onto other device counts. Two processes: in
tests/test_multiprocess.py."""

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
from jadam._sharding import fsdp_spec
from _trees import adam_node
from test_parallel import make_batches

RTOL = 1e-5
ATOL = 1e-7
STEPS = 20


def setup_module():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices", allow_module_level=True)


def init_params() -> dict:
  # Leaves split along different dimensions, and one (b2) that 8 does not
  # divide: it stays replicated.
  rng = np.random.default_rng(0)
  return {"w1": rng.normal(0, 0.5, (4, 16)).astype(np.float32),
          "b1": np.zeros((16,), np.float32),
          "w2": rng.normal(0, 0.5, (16, 8)).astype(np.float32),
          "b2": np.zeros((3,), np.float32)}


def mse(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  out = (h @ params["w2"])[:, :3] + params["b2"]
  return jnp.mean((out.sum(axis=1, keepdims=True) - batch["y"]) ** 2)


OPTIMIZERS = {
    "adam": lambda: jadam.adam(1e-2),
    "adam_eps1": lambda: jadam.adam(1e-2, eps=1.0),
    "adamw_flat": lambda: jadam.adamw(1e-2, weight_decay=0.1, layout="flat"),
    "lamb": lambda: jadam.lamb(1e-2, weight_decay=0.01),  # norms over the shards
    "amsgrad": lambda: jadam.amsgrad(1e-2),
    "optax_chain": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
}


def one_device(tx, steps=STEPS):
  params = jax.tree.map(jnp.asarray, init_params())
  state = tx.init(params)
  losses = []

  @jax.jit
  def step(p, s, b):
    loss, g = jax.value_and_grad(mse)(p, b)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for batch in make_batches(steps):
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return params, state, losses


def run_fsdp(tx, steps=STEPS, n=8, **kwargs):
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  trainer = jadam.parallel.DataParallel(mse, tx, mesh, strategy="fsdp", **kwargs)
  params, state = trainer.init(init_params())
  losses = []
  for batch in make_batches(steps):
    params, state, loss = trainer.step(params, state, batch)
    losses.append(float(loss))
  return trainer, params, state, losses


def moments(state):
  node = adam_node(state)
  decode = lambda m: jax.tree.map(jadam._quant.decode, m,
                                  is_leaf=lambda x: isinstance(x, jadam.QArray))
  return decode(node.mu), decode(node.nu)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_one_device(name):
  want_params, want_state, want_losses = one_device(OPTIMIZERS[name]())
  trainer, params, state, losses = run_fsdp(OPTIMIZERS[name]())
  chex.assert_trees_all_close(trainer.gather(params), want_params, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses, want_losses, rtol=RTOL, atol=ATOL)
  if name != "optax_chain":
    got = moments(trainer.gather(state))
    want = moments(jax.tree.map(np.asarray, want_state))
    if name == "adamw_flat":
      # Packed moments: gather unpacks them; the one-device ones unpacked here.
      want = tuple(jax.tree.map(np.asarray, m.layout.unpack(m)) for m in want)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=ATOL)


def test_quantized_moments():
  # The mean gradient differs from one device's in float32 ulps (another
  # summation order), and a moment on a rounding boundary then takes the
  # neighbouring code: compare the distance from float32 moments instead.
  q8 = lambda: jadam.adam(1e-2, mu_dtype=jadam.Quantized(block_size=16, min_quantized_size=0),
                          nu_dtype=jadam.Quantized(block_size=16, min_quantized_size=0))
  exact, _, _ = one_device(jadam.adam(1e-2))
  one, _, _ = one_device(q8())
  trainer, params, state, _ = run_fsdp(q8())
  assert isinstance(adam_node(state).mu["w2"], jadam.QArray)
  dist = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert 0 < dist(trainer.gather(params), exact) <= 2 * dist(one, exact)


def test_accumulation_and_packed_params_match_one_device():
  want, _, _ = one_device(jadam.adam(1e-2), steps=6)
  for kwargs in ({"accumulation_steps": 4}, {"layout": "flat"}):
    trainer, params, _, _ = run_fsdp(jadam.adam(1e-2), steps=6, **kwargs)
    chex.assert_trees_all_close(trainer.gather(params), want, rtol=RTOL, atol=ATOL,
                                custom_message=str(kwargs))


def test_each_device_holds_one_eighth_and_sends_one_all_reduce():
  params = {"w": jnp.ones((64, 256)), "v": jnp.ones((256, 64)), "b": jnp.ones(7)}
  loss = lambda p, b: jnp.mean((jnp.tanh(b @ p["w"]) @ p["v"]) ** 2) + jnp.sum(p["b"] ** 2)
  mesh = jax.make_mesh((8,), ("data",))
  tx = jadam.adam(1e-3)
  trainer = jadam.parallel.DataParallel(loss, tx, mesh, strategy="fsdp")
  p, s = trainer.init(params)
  first = jax.devices()[0]

  def device0(tree):
    return sum(sh.data.nbytes for x in jax.tree.leaves(tree)
               for sh in x.addressable_shards if sh.device == first)

  split = 4 * (64 * 256 * 2)  # bytes of the two matrices; b (7) stays whole
  assert device0(p) == split // 8 + 4 * 7
  assert device0(s) == 2 * (split // 8 + 4 * 7) + 4  # mu, nu and the count
  plan = jadam.memory_plan(params, strategy="fsdp", n_devices=8, optimizer=tx)
  assert (plan.params, plan.opt_state) == (device0(p), device0(s))
  assert plan.grads == plan.params
  assert jadam.memory_plan(params, strategy="fsdp", n_devices=8) == plan

  # The step all-gathers the params and reduce-scatters the gradients: the
  # bytes of the all-reduce of plain data parallelism, split in two.
  batch = jnp.ones((16, 64))
  report = jadam.parallel.comm_report(trainer, p, s, batch)
  matrices = split * 7 // 8  # (N - 1) / N of each matrix, each way
  assert report.by_kind["all-gather"] == matrices
  assert report.by_kind["reduce-scatter"] == matrices
  plain = jadam.parallel.DataParallel(loss, tx, mesh, strategy="shard_map")
  pp, ps = plain.init(params)
  assert report.bytes_per_device <= jadam.parallel.comm_bytes(plain, pp, ps, batch)


def test_sharding_rule():
  assert fsdp_spec((64, 256), 8, "data") == jax.sharding.PartitionSpec(None, "data")
  assert fsdp_spec((256, 64), 8, "data") == jax.sharding.PartitionSpec("data")
  assert fsdp_spec((7, 3), 8, "data") == jax.sharding.PartitionSpec()
  assert fsdp_spec((), 8, "data") == jax.sharding.PartitionSpec()
  assert fsdp_spec((4,), 8, "data") == jax.sharding.PartitionSpec()


def test_checkpoint_restores_onto_other_device_counts(tmp_path):
  trainer, params, state, _ = run_fsdp(jadam.adam(1e-2), steps=3)
  want = trainer.gather((params, state))
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, params, state)
    ckpt.wait()
    for n in (8, 4, 2):
      mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
      other = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh, strategy="fsdp")
      step, p, s = ckpt.restore(other)
      assert step == 3
      assert p["w1"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
      chex.assert_trees_all_equal(other.gather((p, s)), want, custom_message=f"{n}")
      p, s, _ = other.step(p, s, make_batches(1)[0])  # and the run goes on


def test_model_sharded_params_are_refused():
  mesh = jax.make_mesh((8,), ("data",))
  trainer = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh, strategy="fsdp")
  params = init_params()
  params["w2"] = jax.device_put(params["w2"], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  with pytest.raises(ValueError, match=r"the param at \['w2'\] is already sharded"):
    trainer.init(params)
