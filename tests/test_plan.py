"""jadam.memory_plan against the bytes the trainer's arrays hold on a device
(``addressable_shards``), and ``python -m jadam.plan``."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
import jadam.parallel
from jadam import plan as plan_cli
from jadam._plan import memory_plan
from test_parallel import make_batches

STRATEGIES = ("shard_map", "zero1", "zero2")


def mixed_params() -> dict:
  """float32 and bfloat16 leaves (two flat buffers), a few thousand params."""
  rng = np.random.default_rng(0)
  return {
      "w1": rng.normal(0, 0.5, (4, 600)).astype(np.float32),
      "b1": np.zeros((600,), np.float32),
      "w2": rng.normal(0, 0.5, (600, 1)).astype(jnp.bfloat16),
      "b2": np.zeros((1,), jnp.bfloat16),
  }


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"].astype(jnp.float32) + params["b2"].astype(jnp.float32)
  return jnp.mean((pred - batch["y"]) ** 2)


def device0_bytes(tree) -> int:
  """Bytes the first device of each array's sharding holds."""
  total = 0
  for x in jax.tree.leaves(tree):
    first = x.sharding._device_assignment[0]  # pylint: disable=protected-access
    total += sum(s.data.nbytes for s in x.addressable_shards if s.device == first)
  return total


def measured_grads(trainer, params, batch) -> int:
  """Device 0's bytes of the gradient the strategy keeps for its update."""
  strategy = trainer._strategy  # pylint: disable=protected-access
  with jax.set_mesh(strategy.context_mesh()):
    placed = strategy.place_batch(batch)
    if trainer.strategy == "shard_map":
      grads = jax.jit(jax.grad(loss_fn), out_shardings=strategy.replicated())(
          params, placed)
    elif trainer.strategy == "zero1":  # each device's full local gradient
      layout = strategy.layout_for(params)
      _, _, grads = jax.jit(lambda p, b: strategy.local_grads(
          strategy.config, layout, p, strategy.split_batch(b)))(params, placed)
    else:  # zero2: only its slice of the reduced gradient
      _, _, grads = jax.jit(functools.partial(strategy.reduced_grads,
                                              strategy.layout_for(params)))(params, placed)
  return device0_bytes(grads)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n_devices", [1, 2, 8])
def test_plan_matches_measured_bytes(strategy, n_devices):
  mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
  for moments in (None, jnp.bfloat16):
    optimizer = jadam.adam(1e-2, mu_dtype=moments, nu_dtype=moments)
    trainer = jadam.parallel.DataParallel(loss_fn, optimizer, mesh,
                                          strategy=strategy)
    params, opt_state = trainer.init(mixed_params())
    plan = memory_plan(mixed_params(), strategy=strategy,
                             n_devices=n_devices, mu_dtype=moments,
                             nu_dtype=moments)
    assert plan.params == device0_bytes(params)
    assert plan.opt_state == device0_bytes(opt_state)
    if moments is None:
      assert plan.grads == measured_grads(trainer, params,
                                          make_batches(1, size=8)[0])
    # The optimizer alone gives the same plan.
    assert plan == memory_plan(mixed_params(), strategy=strategy,
                                     n_devices=n_devices, optimizer=optimizer)


def test_zero_bytes_per_param():
  params = {"w": jax.ShapeDtypeStruct((4096, 1024), jnp.float32)}
  for n, state in ((1, 8.0), (2, 4.0), (8, 1.0)):
    plain = memory_plan(params, strategy="plain", n_devices=n)
    zero1 = memory_plan(params, strategy="zero1", n_devices=n)
    zero2 = memory_plan(params, strategy="zero2", n_devices=n)
    assert plain.per_param("opt_state") == pytest.approx(8.0, abs=1e-5)
    assert zero1.per_param("opt_state") == pytest.approx(state, abs=1e-5)
    assert zero2.per_param("grads") == pytest.approx(4.0 / n)
    assert zero1.per_param("grads") == plain.per_param("grads") == 4.0
    assert plain.params == zero1.params == zero2.params == 4 * 4096 * 1024
  bf16 = memory_plan(params, strategy="zero1", n_devices=8,
                     mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  assert bf16.per_param("opt_state") == pytest.approx(0.5, abs=1e-5)
  assert "zero1 on 8 device(s)" in str(bf16)


def test_optimizer_moments():
  params = {"w": jax.ShapeDtypeStruct((1024,), jnp.float32)}
  amsgrad = memory_plan(params, strategy="zero2", n_devices=2,
                        optimizer=jadam.amsgrad(1e-3))
  assert amsgrad.opt_state == 4 + 3 * 512 * 4  # mu, nu, nu_max
  # Any optax optimizer for plain data parallelism, by jax.eval_shape.
  sgd = memory_plan(params, strategy="jit", n_devices=8,
                    optimizer=optax.sgd(0.1, momentum=0.9))
  assert sgd.opt_state == 1024 * 4
  with pytest.raises(ValueError, match=r"strategy='zero1'.*needs a jadam optimizer"):
    memory_plan(params, strategy="zero1", n_devices=2, optimizer=optax.adam(1e-3))
  accumulated = memory_plan({"w": jax.ShapeDtypeStruct((1024,), jnp.bfloat16)},
                            strategy="plain", n_devices=1, accumulation_steps=4)
  assert accumulated.grads == 1024 * 4  # a float32 accumulator


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="zero3", n_devices=2), r"strategy=.*must be one of"),
    (dict(strategy="zero1", n_devices=0), r"n_devices=.*positive integer"),
    (dict(strategy="zero1", n_devices=2, mu_dtype=jnp.int32), r"mu_dtype=.*floating"),
    (dict(strategy="zero1", n_devices=2, accumulation_steps=0),
     r"accumulation_steps=.*positive integer"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    memory_plan({"w": np.zeros(3, np.float32)}, **kwargs)


def test_model_parallel_params_are_measured_per_device():
  # Not in the plan (it is 1-D), but the measured state on a (data x model)
  # mesh is 1/(data) of a model shard's packed blocks.
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  params = {"w": jax.device_put(np.zeros((8, 2048), np.float32),
                                NamedSharding(mesh, P(None, "model")))}
  trainer = jadam.parallel.DataParallel(loss_fn, jadam.adam(1e-2), mesh,
                                        strategy="zero1")
  _, opt_state = trainer.init(params)
  half = memory_plan({"w": jax.ShapeDtypeStruct((8, 1024), jnp.float32)},
                     strategy="zero1", n_devices=4)
  assert device0_bytes(opt_state) == half.opt_state


def test_cli(tmp_path, capsys):
  out = tmp_path / "plan.json"
  assert plan_cli.main(["--params", "1e6", "--devices", "1", "8",
                        "--markdown", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "| float32 | zero1 | 8 |" in text and "| bfloat16 | zero2 | 8 |" in text
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) == 2 * len(plan_cli.STRATEGIES) * 2
  zero2 = [r for r in rows if r["strategy"] == "zero2" and r["devices"] == 8
           and r["moments"] == "float32"]
  assert zero2[0]["bytes_per_param"]["opt_state"] == pytest.approx(1.0, abs=1e-3)


def test_cli_module_runs():
  result = subprocess.run(
      [sys.executable, "-m", "jadam.plan", "--params", "1000", "--devices", "2"],
      capture_output=True, text=True, timeout=60, check=True)
  assert "zero2" in result.stdout


def test_measure():
  result = plan_cli.measure(5000, [1, 8], ["float32", "bfloat16"],
                            accumulation_steps=(1,))
  assert result["num_params"] == 70 * 71
  assert all(r["matches_plan"] for r in result["memory"])
  comm = {r["strategy"]: r["bytes_per_device"] for r in result["comm"]}
  assert set(comm) == {*jadam.parallel.available_strategies(), "onebit (compressed)"}
  for strategy in ("zero1", "zero2", "onebit"):  # onebit: the warm-up step
    assert abs(comm[strategy] / comm["shard_map"] - 1) < 0.05
  assert comm["onebit (compressed)"] <= comm["shard_map"] / 16
  text = plan_cli.format_comm(result["comm"], result["num_params"], markdown=True)
  assert "| zero2 | 8 | 1 |" in text
