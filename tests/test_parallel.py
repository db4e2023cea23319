"""jadam.parallel.DataParallel on 8 fake CPU devices against a single-device,
full-batch optax run: params, the moments mu and nu, and the loss."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh

import jadam.parallel
from jadam.parallel import _common
from jadam.parallel import _strategies

STRATEGIES = ("shard_map", "jit", "pmap")
NUM_DEVICES = 8
BATCH = 64  # 8 devices x 4 micro-batches x 2 rows
STEPS = 20
# float32 results of different summation orders (8 partial means, then their
# mean, against one mean over 64 rows) agree to a few ulps per step; 20 Adam
# steps keep them within this.
RTOL = 1e-5
ATOL = 1e-7


def setup_module():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (tests/conftest.py sets "
                "XLA_FLAGS)", allow_module_level=True)


def make_mesh(axis_type=None) -> Mesh:
  if axis_type is None:  # jax.make_mesh's default: Explicit in JAX 0.10
    return jax.make_mesh((NUM_DEVICES,), ("data",))
  return jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))


def init_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "w1": rng.normal(0, 0.5, (4, 16)).astype(np.float32),
      "b1": np.zeros((16,), np.float32),
      "w2": rng.normal(0, 0.5, (16, 1)).astype(np.float32),
      "b2": np.zeros((1,), np.float32),
  }


def make_batches(steps: int = STEPS, size: int = BATCH, seed: int = 1) -> list:
  """Distinct batches of a noisy regression problem (a dict per step)."""
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(4, 1)).astype(np.float32)
  batches = []
  for _ in range(steps):
    x = rng.normal(size=(size, 4)).astype(np.float32)
    y = np.sin(x @ teacher) + 0.1 * rng.normal(size=(size, 1))
    batches.append({"x": x, "y": y.astype(np.float32)})
  return batches


def predict(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def mse(params, batch):
  return jnp.mean((predict(params, batch["x"]) - batch["y"]) ** 2)


def mse_with_aux(params, batch):
  err = predict(params, batch["x"]) - batch["y"]
  return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err)),
                            "max_err": jnp.max(jnp.abs(err))}


def make_optimizer(name: str, eps: float) -> optax.GradientTransformation:
  if name == "adam":
    return optax.adam(1e-2, eps=eps)
  return optax.adamw(1e-2, eps=eps, weight_decay=1e-2)


@functools.lru_cache(maxsize=None)
def reference(opt_name: str, eps: float, loss_scale: float = 1.0):
  """Single device, full batch: (params, opt_state, losses) after STEPS.

  ``loss_scale`` multiplies the gradient (not the reported loss): with
  ``num_devices`` it is what a shard_map step that pmeans gradients already
  summed over the mesh would do.
  """
  optimizer = make_optimizer(opt_name, eps)
  device = jax.devices()[0]

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(mse)(params, batch)
    grads = jax.tree.map(lambda g: g * loss_scale, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = jax.device_put(init_params(), device)
  opt_state = optimizer.init(params)
  losses = []
  for batch in make_batches():
    params, opt_state, loss = step(params, opt_state,
                                   jax.device_put(batch, device))
    losses.append(float(loss))
  return jax.device_get((params, opt_state)) + (np.array(losses),)


def moments(opt_state) -> dict:
  return {"mu": optax.tree.get(opt_state, "mu"),
          "nu": optax.tree.get(opt_state, "nu"),
          "count": optax.tree.get(opt_state, "count")}


def counting(fn):
  """``fn`` with a count of how many times it is traced."""

  @functools.wraps(fn)
  def wrapped(*args):
    wrapped.traces += 1
    return fn(*args)

  wrapped.traces = 0
  return wrapped


def run_trainer(trainer, steps: int = STEPS, batches=None):
  params, opt_state = trainer.init(init_params())
  losses = []
  for batch in batches or make_batches(steps):
    params, opt_state, loss = trainer.step(params, opt_state, batch)
    losses.append(float(loss))
  return params, opt_state, np.array(losses)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "opt_name,eps,accumulation_steps",
    [("adam", 1e-8, 1),
     # eps larger than sqrt(nu): a gradient N times too large moves params.
     ("adam", 1.0, 1),
     ("adamw", 1e-8, 4)])
def test_matches_single_device_full_batch(strategy, opt_name, eps,
                                          accumulation_steps):
  loss_fn = counting(mse)
  mesh = make_mesh()
  trainer = jadam.parallel.DataParallel(
      loss_fn, make_optimizer(opt_name, eps), mesh, strategy=strategy,
      accumulation_steps=accumulation_steps)
  params, opt_state = trainer.init(init_params())
  init_types = jax.tree.map(jax.typeof, (params, opt_state))
  init_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))

  losses = []
  for i, batch in enumerate(make_batches()):
    old_leaf = params["w1"]
    if i % 2:
      params, opt_state, loss = trainer.step(params, opt_state, batch)
    else:  # a caller's Explicit context mesh changes nothing
      with jax.set_mesh(mesh):
        params, opt_state, loss = trainer.step(params, opt_state, batch)
    assert old_leaf.is_deleted(), "params were not donated"
    losses.append(float(loss))

  assert loss_fn.traces == 1, "the step was traced again after the first"
  # Same layout after 20 steps as after init: nothing drifted or recompiled.
  assert jax.tree.map(jax.typeof, (params, opt_state)) == init_types
  jax.tree.map(
      lambda x, s: s.is_equivalent_to(x.sharding, x.ndim) or pytest.fail(
          f"sharding changed: {s} -> {x.sharding}"),
      (params, opt_state), init_shardings)

  ref_params, ref_state, ref_losses = reference(opt_name, eps)
  got_params, got_state = trainer.gather((params, opt_state))
  chex.assert_trees_all_equal_shapes_and_dtypes(got_params, ref_params)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got_params))
  chex.assert_trees_all_close(np.array(losses), ref_losses, rtol=RTOL)
  chex.assert_trees_all_close(moments(got_state), moments(ref_state),
                              rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got_params, ref_params, rtol=RTOL, atol=ATOL)


class _NaiveShardMap(_strategies.ShardMapStrategy):
  """The trap: grad of replicated params inside shard_map, then pmean."""

  def build_step(self):
    config, axis = self.config, self.config.axis_name
    split = _common.split_local(config.accumulation_steps)

    def per_device(params, opt_state, batch):
      loss, aux, grads = _common.mean_loss_and_grads(config, params, batch,
                                                     split)
      loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis)
      params, opt_state = _common.apply_optimizer(config.optimizer, grads,
                                                  opt_state, params)
      return params, opt_state, loss, aux

    P = jax.sharding.PartitionSpec
    return jax.jit(jax.shard_map(
        per_device, mesh=config.mesh, in_specs=(P(), P(), P(axis)),
        out_specs=(P(), P(), P(), P())), donate_argnums=(0, 1))


@pytest.mark.parametrize("eps", [1e-8, 1.0])
def test_reference_catches_the_gradient_scale_trap(monkeypatch, eps):
  # A step whose gradient is num_devices times too large must fail the checks
  # above: always on mu and nu, and on params once eps is large.
  monkeypatch.setitem(_common._STRATEGIES, "naive", _NaiveShardMap)
  trainer = jadam.parallel.DataParallel(
      mse, make_optimizer("adam", eps), make_mesh(), strategy="naive")
  params, opt_state, losses = run_trainer(trainer)
  got_params, got_state = trainer.gather((params, opt_state))
  ref_params, ref_state, ref_losses = reference("adam", eps)
  # It is exactly a gradient scaled by the device count ...
  scaled_params, scaled_state, _ = reference("adam", eps,
                                             loss_scale=NUM_DEVICES)
  chex.assert_trees_all_close(moments(got_state), moments(scaled_state),
                              rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got_params, scaled_params, rtol=RTOL, atol=ATOL)
  # ... which the moments always show.
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(optax.tree.get(got_state, "mu"),
                                optax.tree.get(ref_state, "mu"),
                                rtol=RTOL, atol=ATOL)
  if eps == 1.0:
    with pytest.raises(AssertionError):
      chex.assert_trees_all_close(got_params, ref_params, rtol=RTOL, atol=ATOL)
  else:  # Adam's scale invariance hides it in the params
    chex.assert_trees_all_close(got_params, ref_params, rtol=1e-3, atol=1e-5)
  chex.assert_trees_all_close(losses[:1], ref_losses[:1], rtol=RTOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_aux_is_the_global_batch_mean(strategy):
  steps = 3
  batches = make_batches(steps)
  trainer = jadam.parallel.DataParallel(
      mse_with_aux, optax.adam(1e-2), make_mesh(), strategy=strategy,
      has_aux=True, accumulation_steps=2)
  params, opt_state = trainer.init(init_params())
  for batch in batches:
    ref_loss, ref_aux = mse_with_aux(trainer.gather(params), batch)
    # Device-resident inputs work as well as numpy ones.
    batch = jax.device_put(batch, jax.devices()[0])
    params, opt_state, (loss, aux) = trainer.step(params, opt_state, batch)
    assert loss.shape == () and aux["mae"].shape == ()
    chex.assert_trees_all_close(loss, ref_loss, rtol=RTOL)
    chex.assert_trees_all_close(aux["mae"], ref_aux["mae"], rtol=RTOL)
    # A max is averaged like any aux: it is the mean of per-shard maxima.
    assert float(aux["max_err"]) <= float(ref_aux["max_err"]) + 1e-6


@pytest.mark.parametrize("strategy", ["shard_map", "jit"])
def test_auto_axis_types_and_multi_axis_mesh(strategy):
  steps = 5
  batches = make_batches(steps)
  optimizer = optax.adam(1e-2)
  ref_params = init_params()
  ref_state = optimizer.init(ref_params)
  for batch in batches:
    grads = jax.grad(mse)(ref_params, batch)
    updates, ref_state = optimizer.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)

  meshes = [make_mesh(AxisType.Auto),
            jax.make_mesh((4, 2), ("data", "model"))]
  for mesh in meshes:
    trainer = jadam.parallel.DataParallel(mse, optimizer, mesh,
                                          strategy=strategy)
    assert trainer.num_devices == mesh.shape["data"]
    params, opt_state, _ = run_trainer(trainer, batches=batches)
    got_params, got_state = trainer.gather((params, opt_state))
    chex.assert_trees_all_close(got_params, ref_params, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(moments(got_state), moments(ref_state),
                                rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lower_exposes_the_all_reduce(strategy):
  trainer = jadam.parallel.DataParallel(mse, optax.adam(1e-2), make_mesh(),
                                        strategy=strategy, accumulation_steps=2)
  params, opt_state = trainer.init(init_params())
  batch = make_batches(1)[0]
  lowered = trainer.lower(params, opt_state, batch)
  assert isinstance(lowered, jax.stages.Lowered)
  hlo = lowered.compile().as_text()
  # One exchange, the all-reduce of the gradients (and loss); the micro-batch
  # split moves no rows between devices.
  collectives = set(re.findall(
      r"\b(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
      r"(?:-start)?\(", hlo))
  assert collectives == {"all-reduce"}, collectives
  # Lowering donates nothing: the same arrays still step.
  params, opt_state, loss = trainer.step(params, opt_state, batch)
  assert np.isfinite(float(loss))


# ---------------------------------------------------------------------------
# Bad input.


def _trainer(**kwargs):
  kwargs.setdefault("mesh", make_mesh())
  return jadam.parallel.DataParallel(mse, optax.adam(1e-2), **kwargs)


def test_unknown_strategy():
  with pytest.raises(ValueError, match=r"strategy=.*must be one of .*'shard_map'"
                     r".*got 'pmapp'"):
    _trainer(strategy="pmapp")


def test_mesh_without_axis_name():
  mesh = jax.make_mesh((NUM_DEVICES,), ("batch",))
  with pytest.raises(ValueError, match=r"axis_name='data'.*has axes \('batch',\)"):
    _trainer(mesh=mesh)
  assert _trainer(mesh=mesh, axis_name="batch").num_devices == NUM_DEVICES


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_accumulation_steps_must_be_positive_int(value):
  with pytest.raises(ValueError, match=r"accumulation_steps=.*positive integer"):
    _trainer(accumulation_steps=value)


def test_pmap_needs_a_one_axis_mesh():
  with pytest.raises(ValueError, match=r"strategy='pmap'.*'model': 2"):
    _trainer(mesh=jax.make_mesh((4, 2), ("data", "model")), strategy="pmap")


def test_bad_optimizer_and_loss():
  with pytest.raises(TypeError, match=r"optimizer=.*GradientTransformation"):
    jadam.parallel.DataParallel(mse, object(), make_mesh())
  with pytest.raises(TypeError, match=r"loss_fn=.*callable"):
    jadam.parallel.DataParallel(None, optax.adam(1.0), make_mesh())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "batch_size,accumulation_steps,match",
    [(60, 1, r"divisible by the 8 devices on mesh axis 'data'; got a batch of 60"),
     (16, 4, r"8 devices on mesh axis 'data' x accumulation_steps=4 = 32; got "
      r"a batch of 16")])
def test_batch_must_divide(strategy, batch_size, accumulation_steps, match):
  trainer = _trainer(strategy=strategy, accumulation_steps=accumulation_steps)
  params, opt_state = trainer.init(init_params())
  batch = make_batches(1, size=batch_size)[0]
  with pytest.raises(ValueError, match=match):
    trainer.step(params, opt_state, batch)
  with pytest.raises(ValueError, match=match):
    trainer.lower(params, opt_state, batch)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_leaves_must_share_a_leading_size(strategy):
  trainer = _trainer(strategy=strategy)
  params, opt_state = trainer.init(init_params())
  batch = make_batches(1)[0]
  batch["y"] = batch["y"][:32]
  with pytest.raises(ValueError, match=r"same leading \(batch\) size; got "
                     r"\['x'\]: 64, \['y'\]: 32"):
    trainer.step(params, opt_state, batch)
  with pytest.raises(ValueError, match=r"leading batch dimension.*\['x'\]"):
    trainer.step(params, opt_state, {"x": np.float32(1.0)})
  with pytest.raises(ValueError, match=r"at least one array"):
    trainer.step(params, opt_state, {})


def test_registry():
  assert set(STRATEGIES) <= set(jadam.parallel.available_strategies())
  with pytest.raises(ValueError, match="already registered"):
    jadam.parallel.register_strategy("jit")(_strategies.JitStrategy)
  trainer = _trainer(strategy="jit", accumulation_steps=2)
  assert "strategy='jit'" in repr(trainer)
  assert trainer.accumulation_steps == 2 and trainer.axis_name == "data"


@pytest.mark.parametrize("strategy", ["shard_map", "jit", "pmap", "zero1", "zero2"])
def test_step_never_deletes_the_callers_params(strategy):
  """init copies: the step donates what init returns, not the caller's arrays."""
  import jadam

  mesh = jax.make_mesh((8,), ("data",))
  params0 = {"w": jnp.ones((3, 1))}
  opt = jadam.adam(1e-2) if strategy.startswith("zero") else optax.adam(1e-2)
  trainer = jadam.parallel.DataParallel(
      lambda p, b: jnp.mean((b @ p["w"]) ** 2), opt, mesh, strategy=strategy)
  params, opt_state = trainer.init(params0)
  trainer.step(params, opt_state, np.ones((8, 3), np.float32))
  assert not params0["w"].is_deleted()
  np.testing.assert_array_equal(np.asarray(params0["w"]), np.ones((3, 1)))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("opt_name", ["adam", "adamw"])
def test_flat_layout_matches_single_device_full_batch(strategy, opt_name):
  """layout="flat": params packed end to end, with jadam's (tree-form)
  optimizer running on the packed buffers; gather unpacks params and moments."""
  import jadam

  opt = (jadam.adam(1e-2, eps=1e-8) if opt_name == "adam"
         else jadam.adamw(1e-2, eps=1e-8, weight_decay=1e-2))
  trainer = jadam.parallel.DataParallel(mse, opt, make_mesh(), strategy=strategy,
                                        layout="flat", accumulation_steps=2)
  params, opt_state = trainer.init(init_params())
  layout = params.layout  # packed params carry their FlatLayout
  assert isinstance(layout, jadam.FlatLayout) and set(layout.keys) == {"float32"}
  losses = []
  for batch in make_batches():
    params, opt_state, loss = trainer.step(params, opt_state, batch)
    losses.append(float(loss))
  leaves = jax.tree.leaves(params)
  assert len(leaves) == 1 and leaves[0].shape[-1] % 1024 == 0  # one packed buffer
  ref_params, ref_state, ref_losses = reference(opt_name, 1e-8)
  got_state = trainer.gather(opt_state)
  chex.assert_trees_all_close(trainer.gather(params), ref_params, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(
      {"mu": got_state[0].mu, "nu": got_state[0].nu, "count": got_state[0].count},
      moments(ref_state), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)


def test_flat_layout_bad_input():
  import jadam

  with pytest.raises(ValueError, match=r"layout=...\)` must be 'tree' or 'flat'"):
    jadam.parallel.DataParallel(mse, optax.adam(1e-2), make_mesh(), layout="packed")
  with pytest.raises(ValueError, match=r"sharded flat layout already"):
    jadam.parallel.DataParallel(mse, jadam.adam(1e-2), make_mesh(), strategy="zero1",
                                layout="flat")
