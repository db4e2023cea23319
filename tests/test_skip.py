"""``skip_nonfinite=True``: a step whose gradient holds a NaN or an inf
changes nothing (zero updates, params, moments and count as they were), the
counters are ``optax.apply_if_finite``'s, and a run that met such a step goes
on bit for bit as one that never saw it: in the tree and flat layouts, the
functional core, and every ``DataParallel`` strategy (one process here; two
in tests/test_multiprocess.py)."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
import jadam.parallel
from test_parallel import init_params
from test_parallel import make_batches
from test_parallel import mse

STEPS, BAD = 6, 3  # the gradient of step BAD (1-based) is not finite
LR = 1e-2
NEVER = jnp.iinfo(jnp.int32).max  # optax.apply_if_finite that never gives up


def poisoned_loss(params, batch):
  # One extra term whose gradient is batch["poison"]'s mean, for one element
  # of b1 only: a NaN or inf there reaches one element of the gradient (and
  # of one device's slice under ZeRO).
  return mse(params, batch) + jnp.mean(batch["poison"]) * params["b1"][3]


def batches(bad_value=None, steps=STEPS, size=64):
  out = []
  for t, b in enumerate(make_batches(steps, size=size), 1):
    poison = np.zeros((size,), np.float32)
    if t == BAD and bad_value is not None:
      poison[size // 2 + 1] = bad_value  # one row, of one device's share
    out.append({**b, "poison": poison})
  return out


def without_bad_step(bs):
  return bs[:BAD - 1] + bs[BAD:]


def train(tx, bs, params=None):
  params = jax.tree.map(jnp.asarray, init_params() if params is None else params)
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: _step(tx, p, s, b))
  history = []
  for b in bs:
    params, state = step(params, state, b)
    history.append((params, state))
  return history


def _step(tx, params, state, batch):
  grads = jax.grad(poisoned_loss)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


OPTIMIZERS = {
    "adam": (lambda **kw: jadam.adam(LR, **kw), lambda: optax.adam(LR)),
    "adamw_mask": (lambda **kw: jadam.adamw(LR, weight_decay=0.1, mask=lambda p: {
        k: k.startswith("w") for k in p}, **kw), lambda: optax.adamw(LR, weight_decay=0.1, mask=lambda p: {
            k: k.startswith("w") for k in p})),
    "amsgrad_flat": (lambda **kw: jadam.amsgrad(LR, layout="flat", **kw),
                     lambda: optax.amsgrad(LR)),
    "lamb_q8": (lambda **kw: jadam.lamb(LR, mu_dtype="q8", **kw), None),
}


@pytest.mark.parametrize("name,bad", [(name, np.nan) for name in OPTIMIZERS]
                         + [("adam", np.inf), ("amsgrad_flat", np.inf)])
def test_a_bad_step_changes_nothing_and_the_run_goes_on(name, bad):
  make, make_optax = OPTIMIZERS[name]
  tx = make(skip_nonfinite=True)
  history = train(tx, batches(bad))
  before, after = history[BAD - 2], history[BAD - 1]
  # The skipped step: params, moments and every counter of optax's tree as
  # they were; apply_if_finite's counters say so.
  chex.assert_trees_all_equal(after[0], before[0])
  chex.assert_trees_all_equal(after[1].inner_state, before[1].inner_state)
  assert int(after[1].notfinite_count) == 1 and int(after[1].total_notfinite) == 1
  assert not bool(after[1].last_finite)
  final = history[-1][1]
  assert int(final.notfinite_count) == 0 and bool(final.last_finite)
  assert int(final.total_notfinite) == 1
  # The rest of the run: bit for bit the run that never saw the bad batch.
  clean = train(tx, without_bad_step(batches()))
  chex.assert_trees_all_equal(history[-1][0], clean[-1][0])
  chex.assert_trees_all_equal(history[-1][1].inner_state, clean[-1][1].inner_state)
  if make_optax is not None:
    # The drop-in contract: optax.apply_if_finite's state tree and numbers
    # (amsgrad_flat: the flat state holds other shapes). To float32 rounding,
    # not bit for bit: XLA:CPU contracts the update's products into FMAs
    # differently once a select (jadam) or a conditional (optax) surrounds it;
    # optax.apply_if_finite is itself a few ulps from optax (the tolerances of
    # tests/test_parallel.py for programs that differ only so).
    ref = train(optax.apply_if_finite(make_optax(), NEVER), batches(bad))
    if "flat" not in name:
      assert jax.tree.structure(ref[-1][1]) == jax.tree.structure(history[-1][1])
      chex.assert_trees_all_close(history[-1][1], ref[-1][1], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(history[-1][0], ref[-1][0], rtol=1e-5, atol=1e-7)


def test_many_bad_steps_in_a_row_are_never_applied():
  tx = jadam.adam(LR, skip_nonfinite=True)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for _ in range(5):
    updates, state = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
    assert not np.any(np.asarray(updates["w"]))
  assert int(state.notfinite_count) == 5 and int(state.inner_state[0].count) == 0
  assert not np.any(np.asarray(state.inner_state[0].nu["w"]))


def test_functional_core_step_and_update():
  params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
  state = jadam.init(params)
  grads = {"w": jnp.array([1.0, 2.0, jnp.inf, 0.0]), "b": jnp.ones(2)}
  new_params, new_state = jax.jit(lambda g, s, p: jadam.step(
      g, s, p, learning_rate=0.1, weight_decay=0.1, skip_nonfinite=True))(grads, state, params)
  chex.assert_trees_all_equal((new_params, new_state), (params, state))
  updates, new_state = jadam.update(grads, state, params, skip_nonfinite=True)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(new_state.count) == 0
  good = {"w": jnp.ones(4), "b": jnp.ones(2)}
  chex.assert_trees_all_equal(
      jadam.update(good, state, params, skip_nonfinite=True),
      jadam.update(good, state, params))
  with pytest.raises(ValueError, match=r"skip_nonfinite=...\)` must be True or False"):
    jadam.adam(LR, skip_nonfinite="yes")


# ------------------------------------------------------------ DataParallel


def dp_params():
  # With a leaf of 2048 elements, ZeRO's flat buffer (4096 elements) spreads
  # real params over every device's slice, and the poisoned element (the
  # leaf's last) lies in another slice than most of them.
  rng = np.random.default_rng(2)
  return {**init_params(), "extra": rng.normal(size=(2048,)).astype(np.float32)}


def dp_loss(params, batch):
  extra = params["extra"]
  return (mse(params, batch) + 1e-2 * jnp.mean(extra**2)
          + jnp.mean(batch["poison"]) * extra[-1])


def _dp_trainer(strategy, tx=None, **kwargs):
  mesh = jax.make_mesh((8,), ("data",))
  tx = tx or jadam.adamw(LR, weight_decay=0.1, skip_nonfinite=True)
  return jadam.parallel.DataParallel(dp_loss, tx, mesh, strategy=strategy, **kwargs)


# One trainer (one compiled step) per strategy and layout for the runs with
# and without the bad step.
_shared_trainer = functools.lru_cache(maxsize=None)(_dp_trainer)


def dp_train(strategy, bs, tx=None, **kwargs):
  if tx is None and isinstance(strategy, str) and set(kwargs) <= {"layout"}:
    trainer = _shared_trainer(strategy, **kwargs)
  else:
    trainer = _dp_trainer(strategy, tx, **kwargs)
  params, state = trainer.init(dp_params())
  history = []
  for b in bs:
    params, state, _ = trainer.step(params, state, b)
    history.append(trainer.gather((params, state)))
  return history


SYNC = ("shard_map", "jit", "pmap", "zero1", "zero2", "fsdp")


@functools.lru_cache(maxsize=None)
def clean_run(strategy, layout):
  """The last (params, state) of a run that never saw step BAD."""
  return dp_train(strategy, without_bad_step(batches()), layout=layout)[-1]


@pytest.mark.parametrize(
    "strategy,layout,bad",
    [(s, "tree", np.nan) for s in SYNC] + [(s, "tree", np.inf) for s in SYNC]
    + [("shard_map", "flat", np.nan), ("jit", "flat", -np.inf)])
def test_every_strategy_skips_on_every_device(strategy, layout, bad):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  history = dp_train(strategy, batches(bad), layout=layout)
  taken = lambda h: (h[0], h[1].inner_state)  # params and state, not the counters
  # Under ZeRO only one device's slice holds the NaN: all devices skip.
  chex.assert_trees_all_equal(taken(history[BAD - 1]), taken(history[BAD - 2]))
  assert int(history[BAD - 1][1].total_notfinite) == 1
  chex.assert_trees_all_equal(taken(history[-1]), taken(clean_run(strategy, layout)))


@pytest.mark.parametrize("strategy", SYNC)
def test_the_flag_rides_with_the_loss(strategy):
  """All devices agree on skipping at no extra collective: the compiled
  step with skip_nonfinite has the all-reduces of the step without it (one,
  the loss's, carrying the flag under ZeRO and FSDP, where each device holds a
  slice of the gradient; the others check the all-reduced gradient)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((8,), ("data",))

  def all_reduces(skip):
    trainer = jadam.parallel.DataParallel(
        mse, jadam.adam(LR, skip_nonfinite=skip), mesh, strategy=strategy)
    params, state = trainer.init(init_params())
    text = trainer.lower(params, state, make_batches(1)[0]).compile().as_text()
    return [line for line in text.splitlines()
            if re.search(r" all-reduce(-start)?\(", line)]

  with_skip = all_reduces(True)
  assert len(with_skip) == len(all_reduces(False)) == 1, with_skip


def test_onebit_keeps_its_error_feedback_on_a_bad_step():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  strategy = jadam.parallel.OneBit(warmup_steps=1)  # step BAD is compressed
  history = dp_train(strategy, batches(np.inf))
  before, after = history[BAD - 2], history[BAD - 1]
  chex.assert_trees_all_equal(after[0], before[0])
  chex.assert_trees_all_equal((after[1].inner.inner_state, after[1].worker_error,
                               after[1].server_error),
                              (before[1].inner.inner_state, before[1].worker_error,
                               before[1].server_error))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(history[-1]))


def test_counters_restore_onto_fewer_devices(tmp_path):
  # The counters are checkpointed with the state; a zero2 state resizes.
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  import jadam.checkpoint  # pylint: disable=import-outside-toplevel
  tx = jadam.adamw(LR, weight_decay=0.1, skip_nonfinite=True)
  trainer = jadam.parallel.DataParallel(dp_loss, tx, jax.make_mesh((8,), ("data",)),
                                        strategy="zero2")
  params, state = trainer.init(dp_params())
  for b in batches(np.nan)[:BAD]:
    params, state, _ = trainer.step(params, state, b)
  four = jadam.parallel.DataParallel(
      dp_loss, tx, jax.make_mesh((4,), ("data",), devices=jax.devices()[:4]), strategy="zero2")
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(BAD, params, state)
    ckpt.wait()
    _, p4, s4 = ckpt.restore(four)
  chex.assert_trees_all_equal(four.gather((p4, s4)), trainer.gather((params, state)))
  assert int(s4.total_notfinite) == 1 and not bool(s4.last_finite)
