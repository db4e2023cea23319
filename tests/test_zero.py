"""ZeRO stages 1 and 2 (``strategy="zero1"``/``"zero2"``) on 8 fake CPU devices
against a single-device, full-batch run of the same optimizer: params, the
gathered moments and the loss; the state's sharding; the collectives of the
compiled step; a 2-D (data x model) mesh with model-sharded params."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
import jadam.parallel
from jadam.parallel import _comm
from test_parallel import counting
from test_parallel import init_params
from test_parallel import make_batches
from test_parallel import mse
from test_parallel import mse_with_aux

NUM_DEVICES = 8
STEPS = 20
RTOL = 1e-5
ATOL = 1e-7
ZERO = ("zero1", "zero2")


def setup_module():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices", allow_module_level=True)


def no_decay_on_biases(params):
  return {k: not k.startswith("b") for k in params}


# Name -> optimizer factory. Every elementwise jadam optimizer, LAMB (norms
# reduced across devices), masked weight decay and low-precision moments.
OPTIMIZERS = {
    "adam": lambda: jadam.adam(1e-2),
    # eps larger than sqrt(nu): a gradient N times too large moves params.
    "adam_eps1": lambda: jadam.adam(1e-2, eps=1.0),
    "adamw_mask": lambda: jadam.adamw(1e-2, weight_decay=0.1,
                                      mask=no_decay_on_biases),
    "amsgrad": lambda: jadam.amsgrad(1e-2),
    "adamax": lambda: jadam.adamax(1e-2),
    "adamaxw": lambda: jadam.adamaxw(1e-2, weight_decay=0.05),
    "radam": lambda: jadam.radam(1e-2),
    "nadam": lambda: jadam.nadam(1e-2),
    "nadamw": lambda: jadam.nadamw(1e-2, weight_decay=0.05),
    "lamb": lambda: jadam.lamb(1e-2, weight_decay=0.01, mask=no_decay_on_biases),
    "adam_bf16_moments": lambda: jadam.adam(1e-2, mu_dtype=jnp.bfloat16,
                                            nu_dtype=jnp.bfloat16),
    # The chains every large-model recipe uses: the global norm is over all
    # devices' slices (CLIP is below the gradient norm of every step: active).
    "clip_adamw": lambda: optax.chain(
        optax.clip_by_global_norm(CLIP),
        jadam.adamw(1e-2, weight_decay=0.1, mask=no_decay_on_biases)),
    "elementwise_lamb": lambda: optax.chain(
        optax.clip(0.05), optax.scale(2.0), jadam.lamb(1e-2, weight_decay=0.01)),
    "finite_clip_nadam": lambda: optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(CLIP), jadam.nadam(1e-2)), 3),
}
CLIP = 0.05
# bfloat16 moments: both runs round mu and nu to 8 bits each step, but from
# gradients summed in another order, so a rounding may land one bfloat16 ulp
# apart (it does not on this problem on CPU; other backends differ): moments
# are compared to one bfloat16 ulp, params and losses as for float32.
BF16_MOMENTS = ("adam_bf16_moments",)


def assert_within_one_bf16_ulp(got, want):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float32)) * 2.0**16
    assert np.all(np.abs(a - b) <= ulp), (jax.tree_util.keystr(path), a, b)


@functools.lru_cache(maxsize=None)
def reference(name: str, steps: int = STEPS):
  """The optimizer on one device over the full batch: (params, state, losses)."""
  optimizer = OPTIMIZERS[name]()
  device = jax.devices()[0]

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(mse)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = jax.device_put(init_params(), device)
  opt_state = optimizer.init(params)
  losses = []
  for batch in make_batches(steps):
    params, opt_state, loss = step(params, opt_state, jax.device_put(batch, device))
    losses.append(float(loss))
  return jax.device_get((params, opt_state)) + (np.array(losses),)


def make_mesh():
  return jax.make_mesh((NUM_DEVICES,), ("data",))



CASES = [
    # (strategy, optimizer, accumulation_steps)
    ("zero1", "adam", 1), ("zero2", "adam", 1),
    ("zero1", "adam_eps1", 1), ("zero2", "adam_eps1", 4),
    ("zero1", "adamw_mask", 4), ("zero2", "adamw_mask", 4),
    ("zero1", "amsgrad", 1), ("zero2", "adamax", 2), ("zero1", "adamaxw", 1),
    ("zero2", "radam", 1), ("zero1", "nadam", 2), ("zero2", "nadamw", 1),
    ("zero1", "lamb", 1), ("zero2", "lamb", 4),
    ("zero1", "adam_bf16_moments", 1), ("zero2", "adam_bf16_moments", 2),
    ("zero1", "clip_adamw", 1), ("zero2", "clip_adamw", 4),
    ("zero1", "elementwise_lamb", 2), ("zero2", "finite_clip_nadam", 1),
]


@pytest.mark.parametrize("strategy,opt_name,accumulation_steps", CASES)
def test_matches_single_device_full_batch(strategy, opt_name, accumulation_steps):
  loss_fn = counting(mse)
  trainer = jadam.parallel.DataParallel(
      loss_fn, OPTIMIZERS[opt_name](), make_mesh(), strategy=strategy,
      accumulation_steps=accumulation_steps)
  params, opt_state = trainer.init(init_params())
  init_types = jax.tree.map(jax.typeof, (params, opt_state))
  losses = []
  for batch in make_batches(STEPS):
    old = params["w1"]
    params, opt_state, loss = trainer.step(params, opt_state, batch)
    assert old.is_deleted(), "params were not donated"
    losses.append(float(loss))
  assert loss_fn.traces == 1, "the step was traced again after the first"
  assert jax.tree.map(jax.typeof, (params, opt_state)) == init_types

  ref_params, ref_state, ref_losses = reference(opt_name)
  got_params, got_state = trainer.gather((params, opt_state))
  chex.assert_trees_all_equal_shapes_and_dtypes(got_params, ref_params)
  # The gathered state has the single-device state's structure: same class,
  # mu/nu per param leaf, same dtypes.
  chex.assert_trees_all_equal_shapes_and_dtypes(got_state, ref_state)
  chex.assert_trees_all_close(np.array(losses), ref_losses, rtol=RTOL)
  if opt_name in BF16_MOMENTS:
    assert jax.tree.leaves(got_state[0].mu)[0].dtype == jnp.bfloat16
    assert_within_one_bf16_ulp((got_state[0].mu, got_state[0].nu),
                               (ref_state[0].mu, ref_state[0].nu))
  else:
    chex.assert_trees_all_close(got_state, ref_state, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got_params, ref_params, rtol=RTOL, atol=ATOL)


def test_adam_matches_optax():
  trainer = jadam.parallel.DataParallel(mse, jadam.adam(1e-2, eps=1.0),
                                        make_mesh(), strategy="zero2",
                                        accumulation_steps=2)
  params, opt_state = trainer.init(init_params())
  optimizer = optax.adam(1e-2, eps=1.0)
  ref_params = init_params()
  ref_state = optimizer.init(ref_params)
  for batch in make_batches(STEPS):
    params, opt_state, _ = trainer.step(params, opt_state, batch)
    grads = jax.grad(mse)(ref_params, batch)
    updates, ref_state = optimizer.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  got_params, got_state = trainer.gather((params, opt_state))
  chex.assert_trees_all_close(got_params, ref_params, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got_state[0].mu, ref_state[0].mu, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got_state[0].nu, ref_state[0].nu, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strategy", ZERO)
def test_device_holds_one_eighth_of_the_state(strategy):
  trainer = jadam.parallel.DataParallel(
      mse, jadam.amsgrad(1e-2, mu_dtype=jnp.bfloat16), make_mesh(),
      strategy=strategy)
  params, opt_state = trainer.init(init_params())
  num_params = sum(x.size for x in jax.tree.leaves(init_params()))
  device0 = jax.devices()[0]
  layout = opt_state[0].mu.layout  # the state carries its sharded layout
  for name in ("mu", "nu", "nu_max"):
    (buf,) = getattr(opt_state[0], name).values()
    assert buf.sharding.spec == P("data")
    shards = {s.device: s.data for s in buf.addressable_shards}
    assert len(shards) == NUM_DEVICES
    mine = shards[device0]
    assert mine.shape == (buf.shape[0] // NUM_DEVICES,)
    # 1/8 of the state, within the padding of the flat buffer.
    assert mine.nbytes * NUM_DEVICES == buf.nbytes
    assert num_params * buf.dtype.itemsize <= buf.nbytes
    assert buf.nbytes - num_params * buf.dtype.itemsize < (
        layout.flat.pad_multiple * buf.dtype.itemsize)
    # No two devices hold the same slice.
    starts = sorted(s.index[0].start for s in buf.addressable_shards)
    assert starts == [i * mine.shape[0] for i in range(NUM_DEVICES)]
  # Params stay whole on every device.
  for leaf in jax.tree.leaves(params):
    assert leaf.addressable_shards[0].data.shape == leaf.shape


def wide_params(width: int = 2048):
  rng = np.random.default_rng(0)
  return {"w1": rng.normal(0, 0.5, (4, width)).astype(np.float32),
          "b1": np.zeros((width,), np.float32),
          "w2": rng.normal(0, 0.5, (width, 16)).astype(np.float32),
          "b2": np.zeros((1,), np.float32)}


def wide_mse(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = jnp.sum(h @ params["w2"], axis=-1, keepdims=True) + params["b2"]
  return jnp.mean((pred - batch["y"]) ** 2)


def _report(strategy, accumulation_steps=1, params=None):
  trainer = jadam.parallel.DataParallel(
      wide_mse, jadam.adam(1e-2), make_mesh(), strategy=strategy,
      accumulation_steps=accumulation_steps)
  params, opt_state = trainer.init(wide_params() if params is None else params)
  return trainer, _comm.comm_report(trainer, params, opt_state,
                                    make_batches(1, size=64)[0])


@pytest.mark.parametrize("strategy", ZERO)
def test_step_reduce_scatters_and_all_gathers(strategy):
  trainer, report = _report(strategy)
  layout = trainer._strategy.layout_for(trainer.params_template)  # pylint: disable=protected-access
  length = layout.flat.buffer("float32").length
  kinds = [c.kind for c in report.collectives]
  assert kinds.count("reduce-scatter") == 1 and kinds.count("all-gather") == 1
  (rs,) = [c for c in report.collectives if c.kind == "reduce-scatter"]
  (ag,) = [c for c in report.collectives if c.kind == "all-gather"]
  assert rs.operands == (f"f32[{length}]",) and rs.group_size == NUM_DEVICES
  assert ag.operands == (f"f32[{length // NUM_DEVICES}]",)
  # The only all-reduce is the loss's: nothing gradient-sized.
  for c in report.collectives:
    if c.kind == "all-reduce":
      assert c.operand_bytes <= 8, c


def test_comm_bytes_equal_plain_data_parallel():
  num_params = sum(x.size for x in jax.tree.leaves(wide_params()))
  n = NUM_DEVICES
  got = {}
  for strategy in ("shard_map", "jit", "pmap", "zero1", "zero2"):
    trainer, report = _report(strategy)
    got[strategy] = report.bytes_per_device
    params, opt_state = trainer.init(wide_params())
    assert jadam.parallel.comm_bytes(
        trainer, params, opt_state, make_batches(1, size=64)[0]) == got[strategy]
  # Plain: one all-reduce of the gradient and the loss, 2 (n - 1) / n of it.
  plain = round(2 * (n - 1) / n * 4 * (num_params + 1))
  assert got["shard_map"] == got["pmap"] == plain
  assert abs(got["jit"] - plain) <= 16  # GSPMD may reduce the loss apart
  # ZeRO: a reduce-scatter and an all-gather of the padded flat buffer.
  length = -(-num_params // 1024) * 1024
  zero = round(2 * (n - 1) / n * 4 * length + 2 * (n - 1) / n * 4)
  assert got["zero1"] == got["zero2"] == zero
  for strategy in ZERO:
    assert abs(got[strategy] - plain) / plain < 0.05, (strategy, got)


def test_zero2_reduce_scatters_every_micro_batch():
  _, zero1 = _report("zero1", accumulation_steps=4)
  _, zero2 = _report("zero2", accumulation_steps=4)
  rs1 = [c for c in zero1.collectives if c.kind == "reduce-scatter"]
  rs2 = [c for c in zero2.collectives if c.kind == "reduce-scatter"]
  assert [c.count for c in rs1] == [1] and [c.count for c in rs2] == [4]
  assert zero2.by_kind["reduce-scatter"] == 4 * zero1.by_kind["reduce-scatter"]
  assert zero2.by_kind["all-gather"] == zero1.by_kind["all-gather"]


@pytest.mark.parametrize("strategy", ZERO)
def test_aux_is_the_global_batch_mean(strategy):
  trainer = jadam.parallel.DataParallel(
      mse_with_aux, jadam.adam(1e-2), make_mesh(), strategy=strategy,
      has_aux=True, accumulation_steps=2)
  params, opt_state = trainer.init(init_params())
  for batch in make_batches(3):
    ref_loss, ref_aux = mse_with_aux(trainer.gather(params), batch)
    params, opt_state, (loss, aux) = trainer.step(params, opt_state, batch)
    assert loss.shape == () and aux["mae"].shape == ()
    chex.assert_trees_all_close(loss, ref_loss, rtol=RTOL)
    chex.assert_trees_all_close(aux["mae"], ref_aux["mae"], rtol=RTOL)


# ---------------------------------------------------------------------------
# 2-D mesh: params sharded over "model", state further split over "data".

MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None),
               "b2": P()}


@pytest.mark.parametrize("strategy,opt_name,accumulation_steps",
                         [("zero1", "adamw_mask", 1), ("zero2", "lamb", 2)])
def test_model_parallel_params(strategy, opt_name, accumulation_steps):
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  params = {k: jax.device_put(v, NamedSharding(mesh, MODEL_SPECS[k]))
            for k, v in init_params().items()}
  trainer = jadam.parallel.DataParallel(
      mse, OPTIMIZERS[opt_name](), mesh, strategy=strategy,
      accumulation_steps=accumulation_steps)
  params, opt_state = trainer.init(params)
  # The params keep their model sharding; the state follows it (one row per
  # model shard) and is split over the data axis.
  for k, leaf in params.items():
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, MODEL_SPECS[k]), leaf.ndim), k
  for name in ("mu", "nu"):
    (buf,) = getattr(opt_state[0], name).values()
    assert buf.sharding.spec == P("model", "data")
    length = buf.shape[1]
    assert buf.addressable_shards[0].data.shape == (1, length // 4)
    # A model shard packs its blocks: half of w1, b1, w2, all of b2.
    assert length == 1024 >= 4 * 8 + 8 + 8 * 1 + 1
  losses = []
  for batch in make_batches(STEPS):
    params, opt_state, loss = trainer.step(params, opt_state, batch)
    losses.append(float(loss))
  ref_params, ref_state, ref_losses = reference(opt_name)
  got_params, got_state = trainer.gather((params, opt_state))
  chex.assert_trees_all_close(np.array(losses), ref_losses, rtol=RTOL)
  chex.assert_trees_all_close(got_state, ref_state, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got_params, ref_params, rtol=RTOL, atol=ATOL)
  # Model-parallel forward/backward all-reduces over "model" only; the
  # gradient exchange over "data" is the reduce-scatter.
  report = _comm.comm_report(trainer, params, opt_state, make_batches(1)[0])
  assert {"reduce-scatter", "all-gather"} <= report.kinds()
  assert all(c.group_size == 4 for c in report.collectives
             if c.kind in ("reduce-scatter", "all-gather"))


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("strategy", ZERO)
def test_callable_mask_sees_the_params_dtypes(strategy):
  """A callable weight-decay mask is given the params' own dtypes (it was
  given float32 for every leaf): here it decays only the float32 leaves."""
  params = init_params()
  params["w2"] = params["w2"].astype(jnp.bfloat16)
  mask = lambda p: jax.tree.map(lambda x: x.dtype == jnp.float32, p)
  optimizer = jadam.adamw(1e-2, weight_decay=0.5, mask=mask)
  trainer = jadam.parallel.DataParallel(
      lambda p, b: mse(jax.tree.map(lambda x: x.astype(jnp.float32), p), b),
      optimizer, make_mesh(), strategy=strategy)
  placed, opt_state = trainer.init(params)
  batch = make_batches(1)[0]
  placed, opt_state, _ = trainer.step(placed, opt_state, batch)
  ref = optax.adamw(1e-2, weight_decay=0.5, mask=mask)
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  grads = jax.grad(mse)(f32, batch)  # the mean gradient, rounded once below
  grads["w2"] = grads["w2"].astype(jnp.bfloat16)
  u, _ = ref.update(grads, ref.init(params), params)
  want = optax.apply_updates(params, u)
  got = trainer.gather(placed)
  assert got["w2"].dtype == jnp.bfloat16
  # bfloat16 gradients averaged over devices round differently: one ulp.
  assert_within_one_bf16_ulp(got["w2"], want["w2"])
  chex.assert_trees_all_close({k: v for k, v in got.items() if k != "w2"},
                              {k: v for k, v in want.items() if k != "w2"},
                              rtol=RTOL, atol=ATOL)
  # The bfloat16 leaf was not decayed: with the old float32 placeholders it was.
  decayed = optax.adamw(1e-2, weight_decay=0.5)
  u_all, _ = decayed.update(grads, decayed.init(params), params)
  assert not np.allclose(np.asarray(optax.apply_updates(params, u_all)["w2"], np.float32),
                         np.asarray(got["w2"], np.float32))


def test_needs_a_jadam_optimizer():
  with pytest.raises(ValueError, match=r"strategy='zero1'.*needs a jadam optimizer"):
    jadam.parallel.DataParallel(mse, optax.adam(1e-2), make_mesh(), strategy="zero1")
  with pytest.raises(ValueError, match=r"strategy='zero2'.*needs a jadam optimizer"):
    jadam.parallel.DataParallel(
        mse, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), make_mesh(),
        strategy="zero2")


def test_clipping_is_active_in_the_chain_cases():
  """The clip_by_global_norm cases clip at every step: the reference's
  gradient norm is above CLIP, and the clipped run ends elsewhere."""
  ref_params, _, _ = reference("clip_adamw")
  plain = optax.adamw(1e-2, weight_decay=0.1, mask=no_decay_on_biases)
  params, state = init_params(), plain.init(init_params())
  for batch in make_batches(STEPS):
    grads = jax.grad(mse)(params, batch)
    assert float(optax.tree.norm(grads)) > CLIP
    updates, state = plain.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert not np.allclose(params["w1"], ref_params["w1"], rtol=1e-3)


@pytest.mark.parametrize("part,name", [
    (lambda: optax.clip_by_block_rms(1.0), "clip_by_block_rms"),
    (lambda: optax.scale_by_trust_ratio(), "scale_by_trust_ratio"),
    (lambda: optax.add_decayed_weights(1e-2, mask=no_decay_on_biases), "masked"),
])
def test_per_leaf_transformations_in_a_chain_are_refused(part, name):
  """On packed slices a per-leaf statistic would silently mean a per-buffer
  one: refused, naming the transformation."""
  with pytest.raises(ValueError, match=rf"only elementwise.*\['{name}'\]"):
    jadam.parallel.DataParallel(
        mse, optax.chain(part(), jadam.adam(1e-2)), make_mesh(), strategy="zero1")


@pytest.mark.parametrize("strategy", ZERO)
def test_global_norm_is_one_scalar_all_reduce(strategy):
  """clip_by_global_norm over the slices adds one scalar to the step's only
  all-reduce (the loss's): no gradient-sized collective."""
  trainer = jadam.parallel.DataParallel(mse, OPTIMIZERS["clip_adamw"](), make_mesh(),
                                        strategy=strategy)
  params, opt_state = trainer.init(init_params())
  report = _comm.comm_report(trainer, params, opt_state, make_batches(1)[0])
  kinds = [c.kind for c in report.collectives]
  assert sorted(kinds) == ["all-gather", "all-reduce", "reduce-scatter"]
  (ar,) = [c for c in report.collectives if c.kind == "all-reduce"]
  assert ar.operands == ("f32[]", "f32[]")


def test_global_norm_on_a_model_axis_is_refused():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  with pytest.raises(ValueError, match=r"global norm over packed slices.*'model': 2"):
    jadam.parallel.DataParallel(
        mse, optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-2)), mesh,
        strategy="zero1")


def test_params_sharded_over_the_data_axis_are_refused():
  mesh = make_mesh()
  params = init_params()
  params["w1"] = jax.device_put(params["w1"], NamedSharding(mesh, P(None, "data")))
  trainer = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh,
                                        strategy="zero2")
  with pytest.raises(ValueError, match=r"\['w1'\] is sharded over the data axis"):
    trainer.init(params)


def test_state_of_other_params_is_refused():
  trainer = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), make_mesh(),
                                        strategy="zero1")
  params, opt_state = trainer.init(init_params())
  other = jadam.parallel.DataParallel(mse, jadam.adam(1e-2), make_mesh(),
                                      strategy="zero1")
  wide, wide_state = other.init(wide_params(1024))
  with pytest.raises(ValueError, match=r"opt_state=.*must be the zero1 state"):
    trainer.step(params, wide_state, make_batches(1)[0])
  with pytest.raises(ValueError, match=r"opt_state=.*must be the zero1 state"):
    trainer.step(params, jadam.adam(1e-2).init(init_params()), make_batches(1)[0])


def test_registered():
  assert {"zero1", "zero2"} <= set(jadam.parallel.available_strategies())
  assert "strategy='zero2'" in repr(jadam.parallel.DataParallel(
      mse, jadam.adam(1e-2), make_mesh(), strategy="zero2"))


# ---------------------------------------------------------------------------
# Two processes (jax.distributed over 127.0.0.1), 4 CPU devices each.


def test_two_processes_match_one_device(tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  import test_multiprocess as mp  # the launcher and reference of the trainer's test

  coordinator = f"127.0.0.1:{mp.free_port()}"
  worker = mp.HERE / "_zero_mp_worker.py"
  strategies = ["zero1", "zero2", "zero2:q8"]
  commands = [[sys.executable, str(worker), "--process-id", str(i),
               "--num-processes", "2", "--coordinator", coordinator,
               "--local-devices", "4", "--out", str(tmp_path),
               "--timeout", str(mp.WORKER_TIMEOUT_S // 2),
               "--strategies", *strategies] for i in range(2)]
  mp.run_processes(commands, tmp_path)
  mp.assert_processes_match_reference(tmp_path, strategies[:2])
  # Quantized moments across processes: the packed buffer's blocks, each
  # device quantizing its own slice, as one device quantizes the same buffer.
  reference = quantized_one_device_reference()
  for process in range(2):
    with np.load(tmp_path / f"zero2:q8-{process}.npz") as f:
      got = dict(f)
    chex.assert_trees_all_close(got, reference, rtol=mp.RTOL, atol=mp.ATOL,
                                custom_message=f"zero2:q8, process {process}")


def quantized_one_device_reference():
  import _mp_worker  # pylint: disable=g-import-not-at-top
  import _zero_mp_worker  # pylint: disable=g-import-not-at-top
  params0, batches = _mp_worker.make_problem()
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  trainer = jadam.parallel.DataParallel(
      _mp_worker.loss_fn, jadam.adam(_mp_worker.LEARNING_RATE,
                                     **_zero_mp_worker.moments(jadam, "q8")),
      mesh, strategy="shard_map", layout="flat",
      accumulation_steps=_mp_worker.ACCUMULATION_STEPS)
  params, opt_state = trainer.init(params0)
  losses = []
  for batch in batches:
    params, opt_state, loss = trainer.step(params, opt_state, batch)
    losses.append(float(loss))
  params = trainer.gather(params)
  node = opt_state[0]
  layout = node.mu.layout
  decoded = {name: layout.unpack({k: jadam._quant.decode(v)
                                  for k, v in getattr(node, name).items()})
             for name in ("mu", "nu")}
  return {"losses": np.array(losses), **_mp_worker.flatten("params", params),
          **_mp_worker.flatten("mu", decoded["mu"]), **_mp_worker.flatten("nu", decoded["nu"])}
