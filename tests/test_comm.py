"""jadam.parallel.comm_bytes: the HLO collective parser on hand-written HLO (every
spelling of replica groups, loops, async pairs, tuples) and on every
strategy's compiled step."""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadam
import jadam.parallel
from jadam._sharding import fsdp_spec
from jadam.parallel import _comm
from jax.sharding import PartitionSpec as P
from test_parallel import make_batches
from test_parallel import mse

HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[1024]{0})->f32[1024]{0}}, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %rs = f32[128]{0} reduce-scatter(%x), channel_id=1, replica_groups=[1,8]<=[8], use_global_device_ids=true, dimensions={0}, to_apply=%add
  %ag = f32[1024]{0} all-gather(%rs), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %ag)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%wrapped_rs (w: f32[1024]) -> f32[256] {
  %w = f32[1024]{0} parameter(0)
  ROOT %r = f32[256]{0} reduce-scatter(%w), channel_id=7, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[1024], b: bf16[4,256], c: f32[128]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %b = bf16[4,256]{1,0} parameter(1)
  %c = f32[128]{0} parameter(2)
  %ar = (f32[1024]{0}, bf16[4,256]{1,0}) all-reduce(%a, %b), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %ags = (f32[128]{0}, f32[512]{0}) all-gather-start(%c), channel_id=4, replica_groups=mesh['x'=4,'y'=2] {'x'}, dimensions={0}, use_global_device_ids=true
  %agd = f32[512]{0} all-gather-done(%ags)
  %cp = f32[1024]{0} collective-permute(%a), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %zero = s32[] constant(0)
  %init = (s32[], f32[1024]{0}) tuple(%zero, %a)
  %w = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"},"known_init_step":{"init":"0","step":"1"}}
  %a2a = f32[1024]{0} all-to-all(%a), channel_id=6, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
  %as = ((f32[1024]{0}), f32[256]{0}) async-start(%a), calls=%wrapped_rs
  %ad = f32[256]{0} async-done(%as), calls=%wrapped_rs
  %ar1 = f32[] all-reduce(%zero), replica_groups={}, to_apply=%add
  ROOT %out = f32[1024]{0} get-tuple-element(%w), index=1
}
"""


def test_parses_every_collective():
  report = _comm.parse_hlo_collectives(HLO)
  assert report.num_devices == 8
  assert report.unknown_trip_counts == ()
  by_name = {c.name: c for c in report.collectives}
  assert set(by_name) == {"ar", "ags", "cp", "rs", "ag", "a2a", "r", "ar1"}

  ar = by_name["ar"]  # a tuple of f32 and bf16 operands, groups of 4
  assert ar.kind == "all-reduce" and ar.group_size == 4
  assert ar.operand_bytes == 1024 * 4 + 4 * 256 * 2
  assert ar.bytes_sent == 2 * 3 / 4 * ar.operand_bytes

  ags = by_name["ags"]  # async pair counted once, mesh-axes groups
  assert ags.kind == "all-gather" and ags.group_size == 4
  assert ags.bytes_sent == 3 * 128 * 4

  cp = by_name["cp"]  # a ring: every device sends its buffer once
  assert cp.kind == "collective-permute" and cp.bytes_sent == 4096

  rs, ag = by_name["rs"], by_name["ag"]  # in a loop of 5 iterations
  assert rs.count == ag.count == 5 and rs.computation == "body"
  assert rs.bytes_sent == 5 * 7 / 8 * 4096
  assert ag.bytes_sent == 5 * 7 * 128 * 4

  a2a = by_name["a2a"]  # iota groups with a transpose: [2,4] -> size 4
  assert a2a.group_size == 4 and a2a.bytes_sent == 3 / 4 * 4096

  r = by_name["r"]  # wrapped in async-start/async-done: counted once
  assert r.kind == "reduce-scatter" and r.count == 1
  assert r.bytes_sent == 3 / 4 * 4096

  ar1 = by_name["ar1"]  # empty groups: every device
  assert ar1.group_size == 8 and ar1.bytes_sent == 2 * 7 / 8 * 4

  # The send model applied by hand to every collective above.
  want = {"all-reduce": 2 * 3 / 4 * (1024 * 4 + 4 * 256 * 2) + 2 * 7 / 8 * 4,
          "all-gather": 3 * 128 * 4 + 5 * 7 * 128 * 4,
          "collective-permute": 1024 * 4,
          "reduce-scatter": 5 * 7 / 8 * 1024 * 4 + 3 / 4 * 1024 * 4,
          "all-to-all": 3 / 4 * 1024 * 4}
  assert report.by_kind == {k: round(v) for k, v in want.items()}
  assert report.bytes_per_device == round(sum(want.values())) == 56839
  assert "total per device" in str(report)


@pytest.mark.parametrize("groups,size", [
    ("{{0,1,2,3,4,5,6,7}}", 8),
    ("{{0,2},{1,3},{4,6},{5,7}}", 2),
    ("{}", 8),
    ("[4,2]<=[8]", 2),
    ("[2,4]<=[4,2]T(1,0)", 4),
    ("[8]<=[8]", 8),
    ("mesh['axis_0'=8] {'axis_0'}", 8),
    ("mesh['axis_0'=1,'axis_1'=8] {'axis_1'}", 8),
    ("mesh['a'=4,'b'=2] {'a','b'}", 8),
    ("mesh['a'=8] {'a':(1)2}", 2),
])
def test_group_sizes(groups, size):
  assert _comm._group_size(groups, 8) == size  # pylint: disable=protected-access


def test_unknown_trip_count_is_reported():
  text = HLO.replace(', backend_config={"known_trip_count":{"n":"5"},'
                     '"known_init_step":{"init":"0","step":"1"}}', "")
  report = _comm.parse_hlo_collectives(text)
  assert report.unknown_trip_counts == ("w",)
  assert {c.count for c in report.collectives if c.computation == "body"} == {1}


def test_send_model_of_a_group_of_one_is_zero():
  text = HLO.replace("replica_groups={}", "replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}")
  by_name = {c.name: c for c in _comm.parse_hlo_collectives(text).collectives}
  assert by_name["ar1"].group_size == 1 and by_name["ar1"].bytes_sent == 0


def test_needs_an_entry():
  with pytest.raises(ValueError, match="no ENTRY"):
    _comm.parse_hlo_collectives("HloModule m\n")


def mlp_params(hidden: int) -> dict:
  """test_parallel's MLP (``mse``) at another width: ``6 hidden + 1`` params."""
  rng = np.random.default_rng(0)
  return {"w1": rng.normal(0, 0.5, (4, hidden)).astype(np.float32),
          "b1": np.zeros((hidden,), np.float32),
          "w2": rng.normal(0, 0.5, (hidden, 1)).astype(np.float32),
          "b2": np.zeros((1,), np.float32)}


def expected_bytes(strategy: str, num_params: int, n: int, k: int,
                   grad_bytes: int = 4, loss_bytes: int = 4) -> dict:
  """Bytes one device sends per step, by kind of collective, for a model of
  ``num_params`` parameters on ``n`` devices with ``k`` micro-batches.

  The send model of jadam/parallel/_comm.py's docstring (ring algorithms,
  per device, over a group of ``n``): all-reduce ``2 (n - 1) / n`` of its
  operand, reduce-scatter ``(n - 1) / n`` of its input, all-gather
  ``(n - 1)`` times its shard. Exact fractions; ``comm_report`` rounds each
  kind's sum to whole bytes.
  """
  f = fractions.Fraction
  all_reduce = lambda b: f(2 * (n - 1), n) * b  # noqa: E731
  grads = num_params * grad_bytes
  if strategy in ("shard_map", "pmap", "onebit"):
    # One pmean of (loss, grads) after the micro-batch loop (1-bit Adam's
    # warm-up step is "shard_map"'s; its compressed step: test_onebit.py).
    return {"all-reduce": all_reduce(grads + loss_bytes)}
  if strategy == "jit":
    # GSPMD keeps the micro-batch accumulator replicated, so every
    # micro-batch's gradient and loss are all-reduced inside the loop
    # (BENCHMARKS.md, "Communication").
    return {"all-reduce": k * all_reduce(grads + loss_bytes)}
  if strategy == "local":
    # LocalSteps(inner_steps=8): the replicas' params all-reduced once every
    # 8 steps (comm_bytes averages over the period), the loss every step.
    return {"all-reduce": all_reduce(num_params * grad_bytes) / 8 + all_reduce(loss_bytes)}
  if strategy == "fsdp":
    # Each param split along a dimension n divides (else replicated): its
    # shards all-gathered and its gradient reduce-scattered once per step
    # (after the micro-batch loop); a replicated param's gradient and the
    # loss all-reduced.
    shapes = [np.shape(x) for x in jax.tree.leaves(mlp_params((num_params - 1) // 6))]
    split = sum(math.prod(s) for s in shapes if fsdp_spec(s, n, "data") != P())
    whole = num_params - split
    out = {"all-reduce": all_reduce(whole * grad_bytes + loss_bytes)}
    if split:
      out["all-gather"] = (n - 1) * f(split, n) * grad_bytes
      out["reduce-scatter"] = f(n - 1, n) * split * grad_bytes
    return out
  assert strategy in ("zero1", "zero2"), strategy
  # One flat float32 buffer, zero padded to a multiple of lcm(1024, n)
  # elements (jadam/_layout.py: sharded_pad_multiple), split into n slices.
  multiple = math.lcm(1024, n)
  length = max(multiple, -(-num_params // multiple) * multiple)
  reduce_scatter = f(n - 1, n) * length * grad_bytes
  # Stage 1 reduce-scatters the accumulated gradient once; stage 2 every
  # micro-batch's. Then one all-gather of the updated params' slices, and
  # the mean of the per-device losses.
  return {"reduce-scatter": (k if strategy == "zero2" else 1) * reduce_scatter,
          "all-gather": (n - 1) * (length // n) * grad_bytes,
          "all-reduce": all_reduce(loss_bytes)}


@pytest.mark.parametrize("n,hidden,k", [
    (8, 16, 1),   # 97 params: one 1024-element buffer for ZeRO
    (8, 200, 2),  # 1201 params: padded to 2048
    (6, 200, 3),  # 6 devices: padded to lcm(1024, 6) = 3072
])
@pytest.mark.parametrize("strategy", jadam.parallel.available_strategies())
def test_every_strategy(strategy, n, hidden, k):
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  params = mlp_params(hidden)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  assert num_params == 6 * hidden + 1
  trainer = jadam.parallel.DataParallel(mse, jadam.adamw(1e-2), mesh,
                                        strategy=strategy, accumulation_steps=k)
  dp_params, opt_state = trainer.init(params)
  batch = make_batches(1, size=2 * n * k)[0]
  report = jadam.parallel.comm_report(trainer, dp_params, opt_state, batch)
  assert isinstance(report, jadam.parallel.CommReport)
  assert report.num_devices == n and report.unknown_trip_counts == ()
  want = expected_bytes(strategy, num_params, n, k)
  assert report.by_kind == {kind: round(b) for kind, b in want.items()}
  total = round(sum(want.values()))
  assert report.bytes_per_device == total
  assert jadam.parallel.comm_bytes(trainer, dp_params, opt_state, batch) == total
  # Reading the HLO ran and donated nothing.
  dp_params, opt_state, loss = trainer.step(dp_params, opt_state, batch)
  assert np.isfinite(float(loss))


def test_counts_what_xla_runs_not_what_was_written():
  # A bfloat16 gradient all-reduce: XLA's CPU backend promotes it to float32
  # (the reduction computation is renamed "..._promoted"), so on CPU it sends
  # as many bytes as a float32 one. comm_bytes reads the compiled program and
  # says so; an estimate from the params' dtype would say half.
  mesh = jax.make_mesh((8,), ("data",))
  params = {"w": np.zeros((64, 256), np.float32)}
  loss = lambda p, b: jnp.mean((b @ p["w"].astype(b.dtype)) ** 2)  # noqa: E731
  reports = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    trainer = jadam.parallel.DataParallel(loss, jadam.adam(1e-3), mesh,
                                          strategy="shard_map")
    p, s = trainer.init(jax.tree.map(lambda x: x.astype(dtype), params))
    reports[dtype] = jadam.parallel.comm_report(
        trainer, p, s, np.ones((8, 64), np.float32).astype(dtype))
  # One pmean of (loss, gradient): 64 x 256 gradient elements and a scalar.
  as_f32 = round(expected_bytes("shard_map", 64 * 256, 8, 1)["all-reduce"])
  as_bf16 = round(expected_bytes("shard_map", 64 * 256, 8, 1, grad_bytes=2,
                                 loss_bytes=2)["all-reduce"])
  assert reports[jnp.float32].bytes_per_device == as_f32 == 114695
  (ar,) = reports[jnp.bfloat16].collectives
  if jax.default_backend() == "cpu":
    assert ar.operands == ("f32[64,256]", "f32[]")
    assert reports[jnp.bfloat16].bytes_per_device == as_f32
  else:
    assert ar.operands[0] in ("f32[64,256]", "bf16[64,256]")
    assert reports[jnp.bfloat16].bytes_per_device in (as_f32, as_bf16)
