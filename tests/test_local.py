"""``strategy=jadam.parallel.LocalSteps(inner_steps=H)`` (DiLoCo) on 8 fake CPU
devices: against a one-device simulation of the algorithm (8 replicas, each
with its own share and inner state, an outer step every H steps); with SGD
inside, H=1 and plain averaging it is ``"shard_map"``; bytes per step from
the compiled HLO; checkpoints; bad options."""

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
from test_parallel import init_params
from test_parallel import make_batches
from test_parallel import mse
from test_parallel import run_trainer

N = 8
RTOL = 1e-5
ATOL = 1e-7


def setup_module():
  if jax.device_count() < N:
    pytest.skip("needs 8 devices", allow_module_level=True)


def mesh():
  return jax.make_mesh((N,), ("data",))


def run(inner, options, steps):
  trainer = jadam.parallel.DataParallel(mse, inner, mesh(), strategy=options)
  return (trainer, *run_trainer(trainer, steps))


def simulate(inner, outer, h, steps):
  """The algorithm on one device: replica r trains on rows [r B/N, (r+1) B/N)
  of each batch with its own inner state; every h steps the outer optimizer
  applies the mean of (global - replica) and the replicas restart from it."""
  anchor = jax.tree.map(jnp.asarray, init_params())
  outer_state = outer.init(anchor)
  replicas = [anchor] * N
  inner_states = [inner.init(anchor) for _ in range(N)]
  grad = jax.jit(jax.value_and_grad(mse))
  losses = []
  for t, batch in enumerate(make_batches(steps), 1):
    share = len(batch["x"]) // N
    step_losses = []
    for r in range(N):
      part = jax.tree.map(lambda x: x[r * share:(r + 1) * share], batch)
      loss, g = grad(replicas[r], part)
      u, inner_states[r] = inner.update(g, inner_states[r], replicas[r])
      replicas[r] = optax.apply_updates(replicas[r], u)
      step_losses.append(float(loss))
    losses.append(np.mean(step_losses))
    if t % h == 0:
      delta = jax.tree.map(lambda a, *rs: a - sum(rs) / N, anchor, *replicas)
      u, outer_state = outer.update(delta, outer_state, anchor)
      anchor = optax.apply_updates(anchor, u)
      replicas = [anchor] * N
  return anchor, replicas, losses


@pytest.mark.parametrize("h,outer", [(4, None), (3, optax.sgd(1.0))])
def test_matches_a_one_device_simulation(h, outer):
  options = jadam.parallel.LocalSteps(inner_steps=h, outer_optimizer=outer)
  steps = 10  # ends mid-period: the replicas have moved since the last outer step
  trainer, params, state, losses = run(jadam.adam(1e-2), options, steps)
  anchor, replicas, want_losses = simulate(jadam.adam(1e-2), options.outer(), h, steps)
  chex.assert_trees_all_close(trainer.gather(params), anchor, rtol=RTOL, atol=ATOL)
  got_replicas = trainer.gather(state).replicas
  for r in range(N):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[r], got_replicas), replicas[r],
                                rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses, want_losses, rtol=RTOL, atol=ATOL)
  assert int(state.count) == steps


def test_sgd_one_inner_step_and_plain_averaging_is_shard_map():
  # Both are linear: averaging the replicas' SGD steps is the SGD step of the
  # averaged gradient.
  options = jadam.parallel.LocalSteps(inner_steps=1, outer_optimizer=optax.sgd(1.0))
  trainer, params, _, losses = run(optax.sgd(0.1), options, 10)
  ref = jadam.parallel.DataParallel(mse, optax.sgd(0.1), mesh(), strategy="shard_map")
  ref_params, ref_state = ref.init(init_params())
  ref_losses = []
  for batch in make_batches(10):
    ref_params, ref_state, loss = ref.step(ref_params, ref_state, batch)
    ref_losses.append(float(loss))
  chex.assert_trees_all_close(trainer.gather(params), ref.gather(ref_params),
                              rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)


def test_bytes_per_step_are_one_h_th_of_shard_map():
  batch = make_batches(1)[0]
  plain = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh(), strategy="shard_map")
  p, s = plain.init(init_params())
  plain_bytes = jadam.parallel.comm_bytes(plain, p, s, batch)
  for h in (1, 4, 16):
    trainer = jadam.parallel.DataParallel(
        mse, jadam.adam(1e-2), mesh(), strategy=jadam.parallel.LocalSteps(inner_steps=h))
    p, s = trainer.init(init_params())
    report = jadam.parallel.comm_report(trainer, p, s, batch)
    # The outer all-reduce of the params every h steps, and the loss's scalar
    # all-reduce every step (2 (N-1)/N x 4 bytes: 7).
    assert report.by_kind == {"all-reduce": round(plain_bytes / h + 7 - 7 / h)}
    assert report.bytes_per_device - 7 <= plain_bytes / h


def test_checkpoint_round_trip(tmp_path):
  options = jadam.parallel.LocalSteps(inner_steps=4)
  trainer, params, state, _ = run(jadam.adam(1e-2), options, 6)
  want = trainer.gather((params, state))
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(6, params, state)
    ckpt.wait()
    other = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh(), strategy=options)
    step, p, s = ckpt.restore(other)
  assert step == 6
  chex.assert_trees_all_equal(other.gather((p, s)), want)
  for batch in make_batches(3):  # two more inner steps, then an outer one
    params, state, _ = trainer.step(params, state, batch)
    p, s, _ = other.step(p, s, batch)
  chex.assert_trees_all_equal(other.gather((p, s)), trainer.gather((params, state)))


def test_named_strategy_and_bad_options():
  trainer = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh(), strategy="local")
  assert trainer.strategy == "local"
  with pytest.raises(ValueError, match=r"LocalSteps\(inner_steps=...\)` must be a positive"):
    jadam.parallel.LocalSteps(inner_steps=0)
  with pytest.raises(ValueError, match=r"outer_optimizer=...\)` must be None or an optax"):
    jadam.parallel.LocalSteps(outer_optimizer="sgd")
