"""jadam in Flax training loops: ``TrainState``, ``nnx.Optimizer`` and
``jadam.parallel.DataParallel``, each against the same loop with optax.

The data is scikit-learn's 8x8 digits (real data, shipped with the package),
the models small MLPs with a LayerNorm, so the trees have the usual Flax
nesting (``{"params": {"Dense_0": {"kernel", "bias"}, ...}}``).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flax = pytest.importorskip("flax")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

import jadam  # noqa: E402
import jadam.parallel  # noqa: E402

STEPS = 20
BATCH = 64
# jadam's float32 tree layout runs optax's operations in optax's order: here
# bit-identical (see tests/test_parity.py). The flat layout computes the same
# elementwise ops on packed buffers, which XLA fuses differently: one update
# can move by an ulp (measured: 2.3e-10 on 1e-3 updates in one jitted step).
# After 20 steps the params differ by at most 1.2e-7 and nu by at most
# 1.1e-6 relative, within RTOL * |nu| + ATOL_NU.
RTOL = 1e-6
ATOL = 1e-7
ATOL_NU = 1e-10


def _has_flat() -> bool:
  try:
    jadam.adam(1e-3, layout="flat")
  except ImportError:
    return False
  return True


LAYOUTS = ("tree", pytest.param("flat", marks=pytest.mark.skipif(
    not _has_flat(), reason="jadam._flat (layout='flat') is not built yet")))


def _optimizers():
  """(name, make(lib, layout)) pairs: the same optimizer from optax or jadam."""

  def adam(lib, layout):
    kw = {"layout": layout} if lib is jadam else {}
    return lib.adam(3e-3, **kw)

  def chain(lib, layout):
    # The usual Flax recipe: clipping, then AdamW on a warmup-cosine schedule
    # with decay masked off biases and LayerNorm scales.
    kw = {"layout": layout} if lib is jadam else {}
    schedule = optax.warmup_cosine_decay_schedule(0.0, 5e-3, 5, STEPS)
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        lib.adamw(schedule, weight_decay=0.1, mask=mask, **kw))

  return {"adam": adam, "clip+adamw(schedule, mask)": chain}


OPTIMIZERS = _optimizers()


# --------------------------------------------------------------------------
# data and models


def digits(n: int = STEPS * BATCH):
  x, y = sklearn_datasets.load_digits(return_X_y=True)
  # Standardized pixels (constant ones stay 0). With raw pixels, border
  # pixels are nonzero in 2 or 3 rows of a batch, and their weights'
  # gradients are sums of a few nearly cancelling terms (~1e-8): Adam divides
  # them by |g| + eps with eps = 1e-8, which turns the last-bit differences
  # of two summation orders (8 shard means vs one batch mean) into 5%
  # differences of the update.
  x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
  x = x.astype(np.float32)
  y = y.astype(np.int32)
  idx = np.random.default_rng(0).permutation(len(x))
  idx = np.resize(idx, n)  # wrap around: 20 x 64 rows
  return x[idx].reshape(-1, BATCH, 64), y[idx].reshape(-1, BATCH)


class LinenMLP(nn.Module):
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden)(x)
    x = nn.LayerNorm()(x)
    x = nn.gelu(x)
    return nn.Dense(10)(x)


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, hidden: int = 32):
    self.dense1 = nnx.Linear(64, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.dense2 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.dense2(nnx.gelu(self.norm(self.dense1(x))))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def moments(opt_state):
  """The ``(mu, nu)`` of the first Adam state in ``opt_state``: optax's
  ``ScaleByAdamState`` or jadam's ``AdamState``, alone or in a chain."""
  found = []

  def visit(node):
    if hasattr(node, "mu") and hasattr(node, "nu"):
      found.append((node.mu, node.nu))
      return True
    return False

  jax.tree.map(lambda _: None, opt_state, is_leaf=visit)
  assert found, f"no Adam state in {jax.tree.structure(opt_state)}"
  return found[0]


def tree_moments(opt_state, params):
  """``(mu, nu)`` as trees shaped like ``params``, whatever the layout
  (``layout="flat"`` keeps them packed, one buffer per dtype)."""
  mu, nu = moments(opt_state)
  if jax.tree.structure(mu) == jax.tree.structure(params):
    return mu, nu
  layout = jadam.FlatLayout.from_tree(params)
  return layout.unpack(mu), layout.unpack(nu)


# --------------------------------------------------------------------------
# flax.training.train_state.TrainState


def run_train_state(tx):
  model = LinenMLP()
  xs, ys = digits()
  params = model.init(jax.random.key(0), xs[0])["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx)
  traces = []

  @jax.jit
  def train_step(state, x, y):
    traces.append(None)  # counts traces: one per compilation

    def loss_fn(params):
      return cross_entropy(state.apply_fn({"params": params}, x), y)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for x, y in zip(xs, ys):
    state, loss = train_step(state, x, y)
    losses.append(loss)
  assert len(traces) == 1, "the train step retraced"
  return state, jnp.stack(losses)


@functools.cache
def optax_train_state(name):
  return run_train_state(OPTIMIZERS[name](optax, None))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_train_state_matches_optax(name, layout):
  ours, our_losses = run_train_state(OPTIMIZERS[name](jadam, layout))
  ref, ref_losses = optax_train_state(name)

  chex.assert_trees_all_close(our_losses, ref_losses, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(ours.params, ref.params, rtol=RTOL, atol=ATOL)
  assert int(ours.step) == int(ref.step) == STEPS
  mu, nu = tree_moments(ours.opt_state, ours.params)
  ref_mu, ref_nu = moments(ref.opt_state)
  chex.assert_trees_all_close(mu, ref_mu, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(nu, ref_nu, rtol=RTOL, atol=ATOL_NU)
  # Training happened: the loss went down on real data.
  assert float(our_losses[-1]) < 0.75 * float(our_losses[0])


# --------------------------------------------------------------------------
# flax.nnx.Optimizer


def run_nnx(tx):
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  xs, ys = digits()
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(None)

    def loss_fn(model):
      return cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  for x, y in zip(xs, ys):
    losses.append(train_step(model, optimizer, x, y))
  assert len(traces) == 1, "the train step retraced"
  # What nnx.Optimizer hands the optimizer: an nnx.State of plain arrays.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  opt_state = nnx.as_pure(optimizer.opt_state)  # Variables -> arrays
  return params, opt_state, int(optimizer.step[...]), jnp.stack(losses)


@functools.cache
def optax_nnx(name):
  return run_nnx(OPTIMIZERS[name](optax, None))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nnx_optimizer_matches_optax(name, layout):
  params, opt_state, step, losses = run_nnx(OPTIMIZERS[name](jadam, layout))
  ref_params, ref_state, ref_step, ref_losses = optax_nnx(name)

  assert step == ref_step == STEPS
  chex.assert_trees_all_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(params, ref_params, rtol=RTOL, atol=ATOL)
  ref_mu, ref_nu = moments(ref_state)
  mu, nu = tree_moments(opt_state, params)
  chex.assert_trees_all_close(mu, ref_mu, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(nu, ref_nu, rtol=RTOL, atol=ATOL_NU)
  assert float(losses[-1]) < 0.75 * float(losses[0])


# --------------------------------------------------------------------------
# jadam.parallel.DataParallel with a Flax model

NUM_DEVICES = 8
DP_BATCH = 128  # 16 rows per device


def strategies():
  # The synchronous strategies (local steps train replicas apart between
  # outer steps, 1-bit Adam compresses after its warm-up: tests/test_local.py,
  # tests/test_onebit.py).
  return tuple(s for s in jadam.parallel.available_strategies()
               if s not in ("local", "onebit"))


def dp_data():
  xs, ys = digits(STEPS * DP_BATCH)
  return xs.reshape(STEPS, DP_BATCH, 64), ys.reshape(STEPS, DP_BATCH)


def linen_loss_fn(model):
  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return cross_entropy(logits, y), {"accuracy": accuracy}
  return loss_fn


def dp_optimizer(layout="tree"):
  return jadam.adamw(3e-3, weight_decay=0.05, layout=layout)


@functools.cache
def single_device_linen():
  """The same training on one device, the full batch per step (jit)."""
  model = LinenMLP()
  xs, ys = dp_data()
  params = model.init(jax.random.key(0), xs[0])["params"]
  tx = dp_optimizer()
  opt_state = tx.init(params)
  loss_fn = linen_loss_fn(model)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  losses = []
  for batch in zip(xs, ys):
    params, opt_state, loss, aux = step(params, opt_state, batch)
    losses.append(loss)
  return params, opt_state, jnp.stack(losses), aux


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (tests/conftest.py sets "
                "XLA_FLAGS)")
  return jax.make_mesh((NUM_DEVICES,), ("data",))


@pytest.mark.parametrize(
    "strategy, layout",
    [(s, "tree") for s in strategies()] + [pytest.param(
        "shard_map", "flat", marks=pytest.mark.skipif(
            not _has_flat(), reason="layout='flat' is not built yet"))])
def test_data_parallel_linen_matches_single_device(mesh, strategy, layout):
  model = LinenMLP()
  xs, ys = dp_data()
  params = model.init(jax.random.key(0), xs[0])["params"]
  trainer = jadam.parallel.DataParallel(
      linen_loss_fn(model), dp_optimizer(layout), mesh, strategy=strategy,
      has_aux=True)
  params, opt_state = trainer.init(params)
  losses = []
  for batch in zip(xs, ys):
    params, opt_state, (loss, aux) = trainer.step(params, opt_state, batch)
    losses.append(float(loss))

  ref_params, ref_state, ref_losses, ref_aux = single_device_linen()
  # 8 per-device means averaged against one mean over 128 rows: a few ulps
  # per step (as in tests/test_parallel.py); measured, params (~0.2) differ
  # by at most 7.5e-8, 5 ulps.
  chex.assert_trees_all_close(np.array(losses), ref_losses,
                              rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(trainer.gather(params), ref_params,
                              rtol=1e-5, atol=2e-7)
  mu, nu = tree_moments(trainer.gather(opt_state), ref_params)
  ref_mu, ref_nu = moments(ref_state)
  # mu and nu, not only params: a gradient N times too large hides in Adam's
  # params but not in its moments.
  chex.assert_trees_all_close(mu, ref_mu, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(nu, ref_nu, rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(float(aux["accuracy"]),
                             float(ref_aux["accuracy"]), atol=1e-6)


def test_data_parallel_nnx_matches_single_device(mesh):
  """An nnx model through DataParallel: split into a graph definition and a
  state of plain arrays, train the state, merge back."""
  xs, ys = dp_data()
  graphdef, params = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)
  params = nnx.as_pure(params)

  def loss_fn(params, batch):
    x, y = batch
    return cross_entropy(nnx.merge(graphdef, params)(x), y)

  trainer = jadam.parallel.DataParallel(loss_fn, dp_optimizer(), mesh)
  dp_params, opt_state = trainer.init(params)
  for batch in zip(xs, ys):
    dp_params, opt_state, loss = trainer.step(dp_params, opt_state, batch)
    loss = float(loss)  # one step in flight at a time: see train_digits.py

  # Reference: nnx.Optimizer on one device, the full batch per step.
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dp_optimizer(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  for x, y in zip(xs, ys):
    ref_loss = step(model, optimizer, x, y)

  np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-5)
  trained = nnx.merge(graphdef, trainer.gather(dp_params))
  chex.assert_trees_all_close(
      nnx.to_pure_dict(nnx.state(trained, nnx.Param)),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)), rtol=1e-5, atol=2e-7)
  # The moments too, at the linen test's tolerances: a gradient N times too
  # large hides in Adam's params but not in mu and nu. Both states are
  # optax's (ScaleByAdamState, EmptyState) over an nnx.State of the params' structure.
  got = trainer.gather(opt_state)
  ref = jax.device_get(nnx.as_pure(optimizer.opt_state))
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  got, ref = got[0], ref[0]  # optax's ScaleByAdamState in both
  assert int(got.count) == int(ref.count) == STEPS
  assert int(optimizer.step[...]) == STEPS
  chex.assert_trees_all_close(got.mu, ref.mu, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(got.nu, ref.nu, rtol=1e-5, atol=1e-10)
