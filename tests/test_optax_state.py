"""The drop-in contract: jadam's optimizers keep optax's own state trees.

For every optax-compatible factory and argument combination, ``init`` returns
the pytree optax's ``init`` returns (classes, nesting, shapes, dtypes); a run
switches from optax to jadam and back through a checkpoint (orbax and
``flax.serialization``) without changing a bit; optax's and Flax's ways of
reading the state work on jadam's.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from _trees import grads_like, nested_tree

# The drop-in's promise: optax's bits and states (XLA's ops), whatever
# $JADAM_KERNEL says.
pytestmark = pytest.mark.usefixtures("default_kernel_mode")

SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 20)
WD_SCHEDULE = optax.linear_schedule(0.1, 0.0, 20)


def matrices(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


MASK_TREE = {"dense": {"w": True, "b": False}, "blocks": False, "scale": False, "empty": True}

LEARNING_RATES = {"float": 1e-2, "array": jnp.asarray(1e-2), "schedule": SCHEDULE}
WEIGHT_DECAYS = {"float": 0.05, "array": jnp.asarray(0.05), "schedule": WD_SCHEDULE}
MASKS = {"none": None, "tree": MASK_TREE, "callable": matrices}


def settings():
  """(factory, kwargs id, kwargs): every argument combination that changes
  optax's state tree or its dtypes."""
  out = []
  with_lr = ["adam", "nadam", "adamw", "nadamw", "amsgrad", "adamax", "adamaxw", "radam", "lamb"]
  with_wd = {"adamw", "nadamw", "adamaxw", "lamb"}
  with_nesterov = {"adam", "nadam", "adamw", "nadamw", "radam"}
  with_mu_dtype = {"adam", "nadam", "adamw", "nadamw", "amsgrad"}
  for name in with_lr:
    for lr_id, lr in LEARNING_RATES.items():
      wd_cases = itertools.product(WEIGHT_DECAYS.items(), MASKS.items()) if name in with_wd else [
          (None, None)]
      for wd, mask in wd_cases:
        kw, ids = {"learning_rate": lr}, [f"lr={lr_id}"]
        if wd is not None:
          kw.update(weight_decay=wd[1], mask=mask[1])
          ids += [f"wd={wd[0]}", f"mask={mask[0]}"]
        out.append((name, "-".join(ids), kw))
    if name in with_nesterov:
      out.append((name, "nesterov", {"learning_rate": 1e-2, "nesterov": name.startswith("n") is False}))
    if name in with_mu_dtype:
      out.append((name, "mu_dtype=bf16", {"learning_rate": 1e-2, "mu_dtype": jnp.bfloat16}))
  out.append(("scale_by_adam", "default", {}))
  out.append(("scale_by_adam", "nesterov-mu_dtype", {"nesterov": True, "mu_dtype": jnp.bfloat16}))
  out.append(("amsgrad", "no-bias-correction",
              {"learning_rate": 1e-2, "bias_correction_mu": False, "bias_correction_nu": False}))
  out.append(("radam", "threshold", {"learning_rate": SCHEDULE, "threshold": 4.0}))
  return out


SETTINGS = settings()


@pytest.mark.parametrize("name,kw_id,kw", SETTINGS, ids=[f"{n}-{i}" for n, i, _ in SETTINGS])
def test_init_is_optax_state_tree(name, kw_id, kw):
  del kw_id
  params = nested_tree()
  got = getattr(jadam, name)(**kw).init(params)
  want = getattr(optax, name)(**kw).init(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  # After an update too (optax's counters advance as optax's do).
  g = grads_like(params, 0)
  got = getattr(jadam, name)(**kw).update(g, got, params)[1]
  want = getattr(optax, name)(**kw).update(g, want, params)[1]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)


def test_nu_dtype_changes_only_a_dtype():
  params = nested_tree()
  got = jadam.adamw(SCHEDULE, mask=matrices, nu_dtype=jnp.bfloat16).init(params)
  want = optax.adamw(SCHEDULE, mask=matrices).init(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got[0].nu))
  chex.assert_trees_all_equal_shapes_and_dtypes(got[0].mu, want[0].mu)


def test_optax_and_flax_read_jadam_state():
  params = nested_tree()
  state = jadam.adamw(1e-2, mask=matrices).init(params)
  assert isinstance(state[0], optax.ScaleByAdamState)
  node = optax.tree_utils.tree_get(state, "ScaleByAdamState")
  assert node is state[0]
  # Flax's model-surgery guide: replace a moment with _replace.
  zeros = jax.tree.map(jnp.ones_like, state[0].mu)
  state = (state[0]._replace(mu=zeros),) + state[1:]
  updates, _ = jadam.adamw(1e-2, mask=matrices).update(grads_like(params, 0), state, params)
  # optax jitted: eager optax rounds its bias corrections differently by an ulp.
  ref, _ = jax.jit(optax.adamw(1e-2, mask=matrices).update)(grads_like(params, 0), state, params)
  chex.assert_trees_all_equal(updates, ref)


def _run(tx, params, state, steps, start):
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  for t in range(start, start + steps):
    params, state = step(params, state, grads_like(params, t))
  return params, state


@pytest.mark.parametrize("name,kw", [
    ("adamw", dict(learning_rate=SCHEDULE, weight_decay=WD_SCHEDULE, mask=matrices)),
    ("amsgrad", dict(learning_rate=1e-2)),
    ("lamb", dict(learning_rate=1e-2, weight_decay=0.01,
                  mask={k: v for k, v in MASK_TREE.items() if k != "empty"})),
])
@pytest.mark.parametrize("direction", ["optax_to_jadam", "jadam_to_optax"])
@pytest.mark.parametrize("saver", ["orbax", "flax"])
def test_switch_a_run_through_a_checkpoint(name, kw, direction, saver, tmp_path):
  """5 steps of one, its state saved and restored into the other, 5 more
  steps: bit for bit the 10 steps of optax alone (float32)."""
  # orbax refuses zero-size arrays: the nested tree without its empty leaf.
  params = {k: v for k, v in nested_tree().items() if k != "empty"}
  opt, jad = getattr(optax, name)(**kw), getattr(jadam, name)(**kw)
  first, second = (opt, jad) if direction == "optax_to_jadam" else (jad, opt)
  p5, s5 = _run(first, params, first.init(params), 5, 0)
  target = jax.eval_shape(second.init, params)
  if saver == "orbax":
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", {"params": p5, "opt_state": s5})
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", {"params": jax.eval_shape(lambda: p5),
                                                  "opt_state": target})
    p5, s5 = restored["params"], restored["opt_state"]
  else:
    from flax import serialization  # pylint: disable=import-outside-toplevel

    blob = serialization.to_bytes({"params": p5, "opt_state": s5})
    zeros = {"params": jax.tree.map(jnp.zeros_like, p5),
             "opt_state": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)}
    restored = serialization.from_bytes(zeros, blob)
    p5, s5 = restored["params"], restored["opt_state"]
  assert jax.tree.structure(s5) == jax.tree.structure(target)
  p10, s10 = _run(second, p5, s5, 5, 5)
  ref_p, ref_s = _run(opt, params, opt.init(params), 10, 0)
  chex.assert_trees_all_equal(p10, ref_p)
  chex.assert_trees_all_equal(s10, ref_s)
  assert np.asarray(jax.tree.leaves(ref_p)[0]).dtype == np.float32


def test_tree_map_params():
  """optax.tree_utils.tree_map_params maps jadam's param-shaped moments (tree
  layout) as optax's; the flat layout says why it cannot and what to do."""
  params = nested_tree()
  mark = lambda x: jnp.full_like(x, 7.0)
  got = optax.tree_utils.tree_map_params(jadam.adamw(1e-2, mask=matrices), mark,
                                         jadam.adamw(1e-2, mask=matrices).init(params))
  want = optax.tree_utils.tree_map_params(optax.adamw(1e-2, mask=matrices), mark,
                                          optax.adamw(1e-2, mask=matrices).init(params))
  chex.assert_trees_all_equal(got, want)
  flat = jadam.adamw(1e-2, layout="flat")
  with pytest.raises(ValueError, match=r"layout='flat'\)` keeps its moments packed.*"
                     r"use layout='tree'"):
    optax.tree_utils.tree_map_params(flat, mark, flat.init(params))


def test_flax_train_state_reads_mu_like_optax():
  train_state = pytest.importorskip("flax.training.train_state")
  params = {k: v for k, v in nested_tree().items() if k != "empty"}

  def run(tx):
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    for t in range(5):
      state = apply(state, grads_like(params, t))
    return state

  got = run(jadam.adamw(SCHEDULE, mask=matrices))
  want = run(optax.adamw(SCHEDULE, mask=matrices))
  chex.assert_trees_all_equal(got.params, want.params)
  chex.assert_trees_all_equal(got.opt_state[0].mu, want.opt_state[0].mu)
  assert jax.tree.structure(got.opt_state) == jax.tree.structure(want.opt_state)


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_flax_nnx_optimizer_on_an_explicit_mesh(layout):
  """nnx.Optimizer over params sharded on an Explicit mesh: ``opt_state[0][1]``
  (the first moment, as in Flax's optimization cookbook) is sharded like the
  params, the whole optimizer state has optax's shardings, and 3 steps equal
  optax's."""
  nnx = pytest.importorskip("flax.nnx")
  from jax.sharding import AxisType, NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

  class MLP(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.l1 = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, (None, "model")),
                           rngs=rngs)
      self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      h = jax.nn.relu(self.l1(x))
      return self.l2(jax.sharding.reshard(h, P("data", None)))

  x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)

  def run(tx):
    with jax.set_mesh(mesh):
      model = MLP(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      xs = jax.device_put(x, NamedSharding(mesh, P("data")))

      @nnx.jit
      def step(model, optimizer, xs):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(xs) ** 2))(model)
        optimizer.update(model, grads)
        return loss

      losses = [float(step(model, optimizer, xs)) for _ in range(3)]
      shardings = jax.tree.map(lambda v: v.sharding.spec, nnx.state(optimizer))
      return losses, optimizer, shardings

  losses, optimizer, shardings = run(jadam.adamw(1e-2, layout=layout))
  ref_losses, ref_optimizer, ref_shardings = run(optax.adamw(1e-2))
  if layout == "flat":
    # Packed moments split over all 8 devices; float32 rounding of the flat pass.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for buf in optimizer.opt_state[0][1].values():
      buf = buf[...] if isinstance(buf, nnx.Variable) else buf
      assert buf.addressable_shards[0].data.size * 8 == buf.size
    return
  assert losses == ref_losses
  assert shardings == ref_shardings
  mu = optimizer.opt_state[0][1]
  assert mu["l1"]["kernel"][...].sharding.spec == P(None, "model")
  chex.assert_trees_all_equal(nnx.to_pure_dict(mu), nnx.to_pure_dict(ref_optimizer.opt_state[0][1]))


@pytest.mark.parametrize("name", ["adamw", "lamb"])
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_flat_state_of_sharded_params_is_sharded(axis_type, name):
  """layout="flat" on params sharded over a mesh: the packed moments are split
  over all its devices (never replicated), the updates come back sharded like
  the params, and 3 jitted steps equal optax's to float32 rounding."""
  from jax.sharding import AxisType, NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(getattr(AxisType, axis_type),) * 2)
  rng = np.random.default_rng(0)
  specs = {"w": P(None, "model"), "v": P("data", "model"), "b": P()}
  shapes = {"w": (8, 16), "v": (4, 8), "b": (16,)}
  params = {k: jax.device_put(rng.normal(size=shapes[k]).astype(np.float32),
                              NamedSharding(mesh, specs[k])) for k in shapes}
  tx = getattr(jadam, name)(1e-2, weight_decay=0.1, mask=matrices, layout="flat")
  ref = getattr(optax, name)(1e-2, weight_decay=0.1, mask=matrices)
  with jax.set_mesh(mesh):
    state, ref_state = tx.init(params), ref.init(params)
    for buf in jax.tree.leaves(state[0].mu) + jax.tree.leaves(state[0].nu):
      assert buf.addressable_shards[0].data.size * 8 == buf.size  # 1/8 per device
    step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
    p, rp = params, params
    for t in range(3):
      g = jax.tree.map(lambda x, s: jax.device_put(jnp.full_like(x, 0.1 * (t + 1)) * x, s.sharding),
                       params, params)
      u, state = step(g, state, p)
      ru, ref_state = ref_step(g, ref_state, rp)
      if axis_type == "Explicit":  # with Auto axes, XLA picks the updates' sharding
        for k in u:
          assert u[k].sharding.is_equivalent_to(params[k].sharding, u[k].ndim), k
      p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ru)
    for buf in jax.tree.leaves(state[0].mu):
      assert buf.addressable_shards[0].data.size * 8 == buf.size
  chex.assert_trees_all_close(p, rp, rtol=1e-6, atol=0)
  mu = state[0].mu.layout.unpack(state[0].mu)
  chex.assert_trees_all_close(mu, ref_state[0].mu, rtol=1e-6, atol=1e-12)
