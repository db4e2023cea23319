"""The fused kernel under GSPMD (8 fake CPU devices): its ``custom_partitioning``
rule runs it on each device's shards, with no collective of its own, bit for
bit the kernel on one device; ``strategy="fsdp"`` with it; and the steps that
cannot be partitioned (LAMB, block-wise quantized moments)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
import jadam.parallel
from jadam import _kernel
from test_fsdp import init_params, mse
from test_parallel import make_batches

pytestmark = pytest.mark.skipif(not _kernel.available(),
                                reason="the fused kernel is not built here (no C++ compiler)")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def setup_module():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices", allow_module_level=True)


def ops(hlo: str) -> dict:
  """How many custom calls and collectives (started or not) a compiled HLO has."""
  return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in ("custom-call",) + COLLECTIVES}


def sharded_problem(dtype=jnp.float32):
  """Params split over 8 devices along different dimensions (and one
  replicated scalar), gradients like them, and a zero state placed alike."""
  # Auto axes: GSPMD splits the step (an Explicit mesh's arrays stay on XLA's ops).
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(2)
  specs = {"w": P(None, "data"), "v": P("data"), "s": P()}
  shapes = {"w": (24, 64), "v": (4096,), "s": ()}
  place = lambda x, k: jax.device_put(jnp.asarray(x, dtype), NamedSharding(mesh, specs[k]))  # pylint: disable=unnecessary-lambda-assignment
  params = {k: place(rng.normal(size=shapes[k]), k) for k in shapes}
  grads = [{k: place(rng.normal(size=shapes[k]) * 1e-2, k) for k in shapes} for _ in range(4)]
  return mesh, params, grads


@pytest.mark.parametrize("master", [None, "q8"])
def test_step_on_sharded_arrays_runs_the_kernel_on_each_shard(monkeypatch, master):
  """``jadam.step`` jitted on params split over a mesh (``jax.set_mesh``):
  one custom call and no collective but the skip flag's all-reduce; the
  params stay split; 4 steps (a NaN on one device's shard at the third,
  skipped everywhere) bit for bit the kernel's on one device."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)  # the default's promise
  dtype = jnp.bfloat16 if master else jnp.float32
  mesh, params, grads = sharded_problem(dtype)
  grads[2]["w"] = grads[2]["w"].at[5, 60].set(jnp.nan)  # on the last device's shard
  step = lambda g, s, p: jadam.step(g, s, p, learning_rate=1e-2, weight_decay=0.1,  # pylint: disable=unnecessary-lambda-assignment
                                    skip_nonfinite=True)
  one = jax.devices()[0]
  p1 = jax.device_put(params, one)
  s1 = jadam.init(p1, master_weights=master)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p: jadam.init(p, master_weights=master))(params)
    compiled = jax.jit(step).lower(grads[0], state, params).compile()
    counts = ops(compiled.as_text())
    assert counts["custom-call"] == 1
    assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0
    p, s = params, state
    for g in grads:
      p, s = jax.jit(step)(g, s, p)
  for g in grads:
    p1, s1 = jax.jit(step)(jax.device_put(g, one), s1, p1)
  assert int(s.count) == int(s1.count) == 3
  for k in params:
    assert p[k].sharding.spec == params[k].sharding.spec
    np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(p1[k]), err_msg=k)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["adamw_fused", "master_q8_auto"])
def test_fsdp_updates_each_shard_with_the_kernel(monkeypatch, name):
  """``strategy="fsdp"``: with ``kernel="fused"`` (float32), and with the
  default on bfloat16 params with q8 master weights (where "auto" runs the
  kernel), the step has one custom call and exactly the XLA path's
  collectives (the state never moves), and 6 steps agree with XLA's ops."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)  # the default's promise
  params = init_params()
  dtype = np.float32
  if name == "master_q8_auto":
    dtype = jnp.bfloat16
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  batches = make_batches(6)
  mesh = jax.make_mesh((8,), ("data",))
  runs = {}
  for kernel in ("xla", "fused" if name == "adamw_fused" else "auto"):
    master = "q8" if name == "master_q8_auto" else None
    tx = jadam.adamw(1e-2, weight_decay=0.1, master_weights=master, kernel=kernel)
    trainer = jadam.parallel.DataParallel(mse, tx, mesh, strategy="fsdp")
    p, s = trainer.init(params)
    runs[kernel] = ops(trainer.lower(p, s, batches[0]).compile().as_text())
    for b in batches:
      p, s, _ = trainer.step(p, s, b)
    runs[kernel] = (runs[kernel], trainer.gather((p, s)))
  (xla_ops, xla_out), (kernel_ops, kernel_out) = runs["xla"], runs.pop("xla") and next(
      iter(runs.values()))
  assert xla_ops["custom-call"] == 0 and kernel_ops["custom-call"] == 1
  assert {k: v for k, v in kernel_ops.items() if k != "custom-call"} == {
      k: v for k, v in xla_ops.items() if k != "custom-call"}
  for a, b in zip(jax.tree.leaves(kernel_out), jax.tree.leaves(xla_out)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if dtype == np.float32:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    else:  # bfloat16 params and q8 corrections: a rounding tie may land either way
      assert np.mean(a != b) < 0.05


def test_what_cannot_be_partitioned_stays_on_xla_under_auto(monkeypatch):
  """On sharded arrays, "auto" runs XLA's ops for LAMB (a norm over each
  whole leaf) and for block-wise quantized moments (a block may straddle
  two shards); "fused" runs the kernel there on gathered operands."""
  monkeypatch.setenv("JADAM_KERNEL", "fused")  # "auto": the kernel wherever it can run
  mesh, params, grads = sharded_problem()
  with jax.set_mesh(mesh):
    for tx, want in ((jadam.adam(1e-2), 1), (jadam.lamb(1e-2), 0),
                     (jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q8"), 0)):
      state = jax.jit(tx.init)(params)
      counts = ops(jax.jit(tx.update).lower(grads[0], state, params).compile().as_text())
      assert counts["custom-call"] == want
    forced = jadam.lamb(1e-2, kernel="fused")
    state = jax.jit(forced.init)(params)
    counts = ops(jax.jit(forced.update).lower(grads[0], state, params).compile().as_text())
    assert counts["custom-call"] >= 1 and counts["all-gather"] > 0
