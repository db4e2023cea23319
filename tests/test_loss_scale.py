"""``DataParallel(loss_scale=...)``: a fixed power-of-two scale changes no
bit of a float32 run; a dynamic one halves on an overflowing step (which is
skipped) and doubles after ``growth_interval`` good steps, in every strategy;
the scale is checkpointed with the state; bad arguments are refused."""

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

N = 8
STEPS = 10
GROWTH = 3


def setup_module():
  if jax.device_count() < N:
    pytest.skip("needs 8 devices", allow_module_level=True)


def mesh():
  return jax.make_mesh((N,), ("data",))


def train(strategy, tx, bs, dtype=np.float32, **kwargs):
  trainer = jadam.parallel.DataParallel(mse, tx, mesh(), strategy=strategy, **kwargs)
  params, state = trainer.init(jax.tree.map(lambda x: x.astype(dtype), init_params()))
  history = []
  for b in bs:
    params, state, loss = trainer.step(params, state, b)
    history.append((trainer.gather((params, state)), trainer.loss_scale(state), float(loss)))
  return trainer, params, state, history


@pytest.mark.parametrize("strategy", ["shard_map", "zero2", "fsdp"])
def test_a_fixed_scale_in_float32_is_the_unscaled_run(strategy):
  # A power of two scales every product exactly: the runs agree to float32
  # rounding (not bit for bit: the programs differ by the scaling, and
  # XLA:CPU contracts products into FMAs differently in each).
  tx = jadam.adamw(1e-2, weight_decay=0.1)
  bs = make_batches(4)
  *_, plain = train(strategy, tx, bs)
  *_, scaled = train(strategy, tx, bs, loss_scale=1024.0)
  for (want, _, want_loss), (got, scale, loss) in zip(plain, scaled):
    chex.assert_trees_all_close((got[0], got[1].inner_state), want, rtol=1e-5, atol=1e-7)
    assert scale == 1024.0  # fixed
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)  # reported unscaled


def overflowing_batches():
  # Targets of 1e3 in step 3: in float16 the scaled gradient overflows.
  out = []
  for t, b in enumerate(make_batches(STEPS), 1):
    b = jax.tree.map(lambda x: x.astype(np.float16), b)
    if t == 3:
      b = {**b, "y": np.full_like(b["y"], 1e3)}
    out.append(b)
  return out


def expected_scales(total_notfinite):
  """The dynamic rule, from which steps were skipped."""
  scale, good, out = 2.0**15, 0, []
  for skipped in np.diff([0] + total_notfinite):
    if skipped:
      scale, good = scale / 2, 0
    else:
      good += 1
      if good == GROWTH:
        scale, good = scale * 2, 0
    out.append(scale)
  return out


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "zero1", "fsdp", "onebit"])
def test_dynamic_scale_in_float16(strategy):
  tx = jadam.adam(1e-2, skip_nonfinite=True, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  options = jadam.parallel.OneBit(3) if strategy == "onebit" else strategy
  trainer, params, state, history = train(
      options, tx, overflowing_batches(), np.float16, loss_scale="dynamic",
      loss_scale_growth_interval=GROWTH)
  skipped = [int(optax.tree.get(h[0][1], "total_notfinite")) for h in history]
  scales = [h[1] for h in history]
  assert skipped[2] > skipped[1]  # the overflowing step
  assert scales == expected_scales(skipped), (scales, skipped)
  assert max(scales) > scales[2]  # it grew again
  for t in range(STEPS):
    if t and skipped[t] > skipped[t - 1]:  # a skipped step moved nothing
      chex.assert_trees_all_equal(history[t][0][0], history[t - 1][0][0])
  assert all(np.isfinite(h[2]) for h in history[3:])
  assert jax.tree.leaves(trainer.gather(params))[0].dtype == np.float16


def test_scale_is_checkpointed(tmp_path):
  tx = jadam.adam(1e-2, skip_nonfinite=True, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  trainer, params, state, history = train(
      "zero2", tx, overflowing_batches()[:4], np.float16, loss_scale="dynamic",
      loss_scale_growth_interval=GROWTH)
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, params, state)
    ckpt.wait()
    other = jadam.parallel.DataParallel(
        mse, tx, jax.make_mesh((4,), ("data",), devices=jax.devices()[:4]),
        strategy="zero2", loss_scale="dynamic", loss_scale_growth_interval=GROWTH)
    _, p, s = ckpt.restore(other)
  assert other.loss_scale(s) == history[-1][1] < 2.0**15
  chex.assert_trees_all_equal(other.gather((p, s)), trainer.gather((params, state)))


def test_bad_arguments():
  with pytest.raises(ValueError, match="needs a jadam optimizer with skip_nonfinite=True"):
    jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh(), loss_scale="dynamic")
  with pytest.raises(ValueError, match=r"loss_scale=...\)` must be None, 'dynamic' or a"):
    jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh(), loss_scale=-2.0)
  with pytest.raises(ValueError, match=r"loss_scale_growth_interval=...\)` must be a pos"):
    jadam.parallel.DataParallel(mse, jadam.adam(1e-2, skip_nonfinite=True), mesh(),
                                loss_scale="dynamic", loss_scale_growth_interval=0)
  trainer = jadam.parallel.DataParallel(mse, optax.adam(1e-2), mesh(), loss_scale=8.0)
  params, state = trainer.init(init_params())
  assert trainer.loss_scale(state) == 8.0  # any optax optimizer, a fixed scale
  params, state, loss = trainer.step(params, state, make_batches(1)[0])
  assert np.isfinite(float(loss))


def test_dynamic_scale_stays_within_bounds():
  from jadam import _loss_scale  # pylint: disable=import-outside-toplevel
  tx = _loss_scale.with_loss_scale(jadam.adam(1e-2, skip_nonfinite=True), "dynamic",
                                   growth_interval=1)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(60):  # halving every step: floored at 2**-24, never 0
    _, state = update({"w": jnp.full(3, jnp.nan)}, state, params)
  assert float(state.scale) == 2.0**-24
  for _ in range(60):  # doubling every good step: capped at 2**24, never inf
    _, state = update({"w": jnp.ones(3)}, state, params)
  assert float(state.scale) == 2.0**24
