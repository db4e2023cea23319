"""Every ```python block of README.md runs as written, in order, and does what
the README says it does: each is checked against optax on one device in
float32, a float64 computation, or the bytes the arrays hold.

Blocks that continue one another (the quickstart and the functional core; the
two flat-layout blocks) share a namespace. The data-parallel blocks start from
names the README leaves to the reader (``loss_fn``, ``params``, ``batch``,
``mesh``); each test gives them the small regression problem of
``tests/_mp_worker.py``. Where a test supplies anything else or changes a
block's text, the reason is named next to it.
"""

from __future__ import annotations

import pathlib
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _mp_worker
import jadam
import jadam.parallel
from test_multiprocess import free_port, run_processes

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NUM_DEVICES = 8
# Data-parallel results sum the gradient in another order (8 partial means,
# then their mean) than one device does; one Adam step keeps them within a
# few ulps (the tolerances of tests/test_parallel.py).
RTOL = 1e-5
ATOL = 1e-7
# The flat layout's results equal the tree form's "to float32 rounding"
# (README, "Flat state, tree in and out"): a few ulps.
FLAT_RTOL = 1e-6
BF16_ULP = 2.0**-7  # bfloat16's relative spacing: one rounding

# One distinctive line of each block. A block without a marker (a block added
# to the README) fails test_every_block_has_a_test until it gets a test here.
MARKERS = {
    "quickstart": "tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(",
    "functional core": "state = jadam.init(params)",
    "flat end to end": "layout = jadam.FlatLayout.from_tree(params)",
    "flat state": 'layout="flat")',
    "data parallel": ("jadam.adam(1e-3), mesh)\n"
                      "params, opt_state = trainer.init(params)\n"),
    "multi-process": "jax.distributed.initialize(",
    "zero": 'strategy="zero1")',
    "fsdp": 'strategy="fsdp")',
    "onebit": "strategy=jadam.parallel.OneBit(warmup_steps=2000))",
    "skip": "skip_nonfinite=True)\nstate = tx.init(params)",
    "loss scale": 'loss_scale="dynamic")',
    "master weights": 'master_weights="q8")\nstate = tx.init(params)',
    "model parallel": 'mesh = jax.make_mesh((4, 2), ("data", "model"))',
    "memory plan": "plan = jadam.memory_plan(",
    "checkpoint": "ckpt = jadam.checkpoint.Checkpointer(",
}


def readme_blocks() -> list[tuple[int, str]]:
  """``(line, source)`` of every ```python block of the README, in order."""
  text = README.read_text()
  return [(text.count("\n", 0, m.start()) + 2, m.group(2))
          for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text,
                               re.S | re.M)]


def block(name: str) -> tuple[int, str]:
  found = [(line, src) for line, src in readme_blocks()
           if MARKERS[name] in src]
  assert len(found) == 1, f"{len(found)} README blocks match {name!r}"
  return found[0]


def run_block(name: str, namespace: dict, *, replace=()) -> dict:
  """Executes the README block ``name`` in ``namespace`` (a traceback names
  the README line); ``replace`` is ``(old, new)`` pairs applied to its text."""
  line, src = block(name)
  for old, new in replace:
    assert old in src, f"{old!r} is no longer in the {name!r} block"
    src = src.replace(old, new)
  code = compile("\n" * (line - 1) + src, f"{README} ({name})", "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def test_every_block_has_a_test():
  blocks = readme_blocks()
  for line, src in blocks:
    names = [n for n, marker in MARKERS.items() if marker in src]
    assert len(names) == 1, (
        f"README.md:{line}: a python block that {len(names)} tests run "
        f"({names}); give it one marker in MARKERS:\n{src}")
  assert len(blocks) == len(MARKERS)


def assert_equal(got, want, what: str) -> None:
  """Bit for bit: same structure, same values."""
  got, want = jax.device_get((got, want))
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  jax.tree.map(
      lambda g, w: np.testing.assert_array_equal(g, w, err_msg=what),
      got, want)


# --------------------------------------------- quickstart and functional core


@pytest.mark.usefixtures("default_kernel_mode")  # the README's claims: optax's bits
def test_quickstart_and_functional_core():
  namespace: dict = {}
  run_block("quickstart", namespace)
  loss_fn, x, y = namespace["loss_fn"], namespace["x"], namespace["y"]
  first_loss = float(loss_fn(
      {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, x, y))
  assert float(namespace["loss"]) < first_loss  # it trained

  # The same loop with optax.adamw in the chain: float32 jadam is optax to
  # the bit over the 100 steps (README: "bit-identical to optax's").
  ref_tx = optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(1e-3, weight_decay=0.01))

  @jax.jit
  def ref_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = ref_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  ref_params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  ref_state = ref_tx.init(ref_params)
  for _ in range(100):
    ref_params, ref_state, ref_loss = ref_step(ref_params, ref_state)
  assert_equal(namespace["params"], ref_params, "quickstart params")
  for name in ("count", "mu", "nu"):  # jadam's state is not optax's tuple
    assert_equal(optax.tree.get(namespace["opt_state"], name),
                 optax.tree.get(ref_state, name), f"quickstart {name}")
  assert float(namespace["loss"]) == float(ref_loss)

  params0 = jax.device_get(namespace["params"])  # the block donates them
  run_block("functional core", namespace)
  assert int(namespace["state"].count) == 2

  # jadam.step with learning_rate=3e-4 is one optax.adam(3e-4) step, and
  # jadam.update with weight_decay=0.01 (default learning rate 1e-3) then is
  # optax.adamw(1e-3, weight_decay=0.01) from that state: bit for bit.
  adam = optax.adam(3e-4)
  adam_state = adam.init(params0)
  updates, adam_state = adam.update(jax.grad(loss_fn)(params0, x, y),
                                    adam_state, params0)
  params1 = optax.apply_updates(params0, updates)
  assert_equal(namespace["params"], params1, "params after jadam.step")
  adamw = optax.adamw(1e-3, weight_decay=0.01)
  adamw_state = (adam_state[0],) + tuple(adamw.init(params1)[1:])
  updates, adamw_state = adamw.update(jax.grad(loss_fn)(params1, x, y),
                                      adamw_state, params1)
  assert_equal(namespace["updates"], updates, "updates of jadam.update")
  assert_equal(namespace["state"].mu, adamw_state[0].mu, "mu")
  assert_equal(namespace["state"].nu, adamw_state[0].nu, "nu")

  # "a new learning-rate array never retraces": another value, same program.
  train_step = namespace["train_step"]
  copies = jax.tree.map(jnp.copy, (namespace["params"], namespace["state"]))
  train_step(*copies, x, y, jnp.float32(1e-4))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access


# ----------------------------------------------------------- the flat layout


def tree_loss(params, x, y):
  """The flat block's loss on the tree, written here again: the reference."""
  logits = (x @ params["w"] + params["b"]) * params["scale"].astype(jnp.float32)
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def assert_updates_close(got, want) -> None:
  """The flat block's updates against optax's: float32 leaves to float32
  rounding, the bfloat16 scale to one bfloat16 rounding."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], want[k], rtol=FLAT_RTOL, atol=0,
                               err_msg=k)
  assert got["scale"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got["scale"], np.float32),
                             np.asarray(want["scale"], np.float32),
                             rtol=BF16_ULP)


def test_flat_layout_blocks():
  namespace: dict = {}
  run_block("flat end to end", namespace)
  layout, packed = namespace["layout"], namespace["packed"]
  x, y = namespace["x"], namespace["y"]
  params0 = {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10),
             "scale": jnp.ones((), jnp.bfloat16)}

  # The block's comments: the buffers' shapes, a static and hashable layout.
  assert {k: v.shape for k, v in packed.items()} == {
      "bfloat16": (1024,), "float32": (8192,)}
  same = jadam.FlatLayout.from_tree(params0)
  assert same == layout and hash(same) == hash(layout)
  # Padding stays exactly zero: packing the unpacked params again (pack
  # writes zeros there) gives back every buffer bit for bit.
  assert_equal(layout.pack(layout.unpack(packed)), packed, "padding")
  # jax.grad of the packed loss is packed like `packed`, and holds the
  # gradient of the same loss on the tree.
  grads = jax.grad(namespace["loss_fn"])(packed, x, y)
  assert jax.tree.structure(grads) == jax.tree.structure(packed)
  chex.assert_trees_all_close(
      layout.unpack(grads), jax.grad(tree_loss)(layout.unpack(packed), x, y),
      rtol=FLAT_RTOL)

  # One step: the float32 leaves are optax.adamw's to float32 rounding; the
  # bfloat16 scale is the float64 step rounded once to bfloat16.
  tree_grads = jax.grad(tree_loss)(params0, x, y)
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  updates, _ = tx.update(tree_grads, tx.init(params0), params0)
  want = optax.apply_updates(params0, updates)
  got = namespace["params"]
  chex.assert_trees_all_close({k: got[k] for k in ("w", "b")},
                              {k: want[k] for k in ("w", "b")},
                              rtol=FLAT_RTOL, atol=0)
  # At w = b = 0 the scale's gradient is 0: Adam's 0 / (0 + eps) must be 0
  # (optax#1754 is NaN here), leaving -lr * wd * 1, which rounds away.
  g = np.float64(tree_grads["scale"].astype(jnp.float32))
  scale = 1.0 - 1e-3 * (g / (abs(g) + 1e-8) + 1e-4 * 1.0)
  assert got["scale"].dtype == jnp.bfloat16
  assert float(got["scale"]) == float(jnp.asarray(scale, jnp.bfloat16))

  # The next block applies the optimizer to `grads`, which the README does
  # not define in this section: give it the gradient of the loss above at
  # the block's params.
  params1 = namespace["params"]
  namespace["grads"] = jax.grad(tree_loss)(params1, x, y)
  run_block("flat state", namespace)

  # Tree in, tree out: optax.adamw with the same mask on the same tree.
  ref_tx = optax.adamw(1e-3, weight_decay=1e-4,
                       mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  updates, ref_state = ref_tx.update(namespace["grads"],
                                     ref_tx.init(params1), params1)
  assert_updates_close(namespace["updates"], updates)
  # At these params (|p| <= 1e-3) the weight decay is 1e-7 of the update:
  # the block's `tx` again at params of 100, where the decay and its mask
  # (w only) are 1% of it.
  far = jax.tree.map(lambda p: jnp.full_like(p, 100), params1)
  tx = namespace["tx"]
  assert_updates_close(
      tx.update(namespace["grads"], tx.init(far), far)[0],
      ref_tx.update(namespace["grads"], ref_tx.init(far), far)[0])
  # "optax's tree; opt_state[0].mu is a jadam.Packed": one 1-D buffer per
  # dtype, which unpack to optax's first moment.
  opt_state = namespace["opt_state"]
  assert isinstance(opt_state[0], optax.ScaleByAdamState)
  assert isinstance(opt_state[0].mu, jadam.Packed)
  assert {k: v.ndim for k, v in opt_state[0].mu.items()} == {
      "bfloat16": 1, "float32": 1}
  mu = opt_state[0].mu.layout.unpack(opt_state[0].mu)
  for k in ("w", "b"):
    np.testing.assert_allclose(mu[k], ref_state[0].mu[k], rtol=FLAT_RTOL,
                               atol=0)


# ------------------------------------------------- data-parallel training


def problem() -> dict:
  """What the data-parallel blocks take as given: the imports of the blocks
  above, numpy params, the mean loss over a batch, one global batch (32
  rows) and the 8-device mesh."""
  params, (batch,) = _mp_worker.make_problem(steps=1)
  return {"jax": jax, "jnp": jnp, "jadam": jadam,
          "loss_fn": _mp_worker.loss_fn, "params": params, "batch": batch,
          "mesh": jax.make_mesh((NUM_DEVICES,), ("data",))}


def one_device(optimizer, steps: int = 1) -> tuple:
  """``steps`` steps of ``optimizer`` on one device, on the whole batch:
  (params, the first state with a ``mu``, loss)."""
  params, batches = _mp_worker.make_problem(steps=steps)
  opt_state = optimizer.init(params)
  for batch in batches:
    loss, grads = jax.value_and_grad(_mp_worker.loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state, loss


def assert_matches(trainer, params, opt_state, optimizer, what: str) -> None:
  """Gathered params, mu and nu against one device on the whole batch."""
  ref_params, ref_state, _ = one_device(optimizer)
  params, opt_state = trainer.gather((params, opt_state))
  chex.assert_trees_all_close(params, ref_params, rtol=RTOL, atol=ATOL,
                              custom_message=f"{what}: params")
  # The moments too: Adam's first step is nearly scale invariant, so a
  # gradient N times too large would hide in the params but not in mu.
  for name in ("mu", "nu"):
    chex.assert_trees_all_close(
        optax.tree.get(opt_state, name), optax.tree.get(ref_state, name),
        rtol=RTOL, atol=ATOL, custom_message=f"{what}: {name}")


def device0_bytes(tree) -> int:
  return sum(leaf.addressable_shards[0].data.nbytes
             for leaf in jax.tree.leaves(tree))


needs_devices = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")


@needs_devices
def test_data_parallel_block():
  namespace = run_block("data parallel", problem())
  assert_matches(namespace["trainer"], namespace["params"],
                 namespace["opt_state"], optax.adam(1e-3), "DataParallel")
  _, _, ref_loss = one_device(optax.adam(1e-3))
  np.testing.assert_allclose(float(namespace["loss"]), float(ref_loss),
                             rtol=RTOL)


# The multi-process block as a program: `python -c WORKER block out
# coordinator P i`. It runs the block's text with the coordinator's real
# address for "host0:1234" and writes the gathered params and moments.
WORKER = """
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np
import _mp_worker

def main():
  src, out, coordinator, num_processes, i = sys.argv[1:]
  P, i = int(num_processes), int(i)
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax, optax, jadam, jadam.parallel
  jax.config.update("jax_num_cpu_devices", 2)
  params, (batch,) = _mp_worker.make_problem(steps=1)
  rows = len(batch[0]) // P
  namespace = dict(jax=jax, jadam=jadam, P=P, i=i, params=params,
                   loss_fn=_mp_worker.loss_fn,
                   local_batch=tuple(a[i * rows:(i + 1) * rows] for a in batch))
  code = open(src).read().replace("host0:1234", coordinator)
  exec(compile(code, src, "exec"), namespace)
  assert jax.process_count() == P and jax.device_count() == 2 * P
  trainer = namespace["trainer"]
  params, opt_state = trainer.gather((namespace["params"], namespace["opt_state"]))
  np.savez(out, loss=np.asarray(namespace["loss"]),
           **_mp_worker.flatten("params", params),
           **_mp_worker.flatten("mu", optax.tree.get(opt_state, "mu")),
           **_mp_worker.flatten("nu", optax.tree.get(opt_state, "nu")))
  jax.distributed.shutdown()
  return 0

_mp_worker.run_worker(main)
"""


def test_multi_process_block(tmp_path):
  """Two local processes, 2 CPU devices each, run the block as written
  (the coordinator's address aside); each process feeds rows
  [i * B / P, (i + 1) * B / P) and gets one device's result on the whole
  batch."""
  line, src = block("multi-process")
  source = tmp_path / "block.py"
  source.write_text("\n" * (line - 1) + src)
  coordinator = f"127.0.0.1:{free_port()}"
  worker = WORKER.format(tests=str(pathlib.Path(__file__).parent))
  run_processes([[sys.executable, "-c", worker, str(source),
                  str(tmp_path / f"{i}.npz"), coordinator, "2", str(i)]
                 for i in range(2)], tmp_path)

  ref_params, ref_state, ref_loss = one_device(optax.adam(1e-3))
  reference = {"loss": np.asarray(ref_loss),
               **_mp_worker.flatten("params", ref_params),
               **_mp_worker.flatten("mu", optax.tree.get(ref_state, "mu")),
               **_mp_worker.flatten("nu", optax.tree.get(ref_state, "nu"))}
  for i in range(2):
    with np.load(tmp_path / f"{i}.npz") as f:
      got = dict(f)
    chex.assert_trees_all_close(got, reference, rtol=RTOL, atol=ATOL,
                                custom_message=f"process {i}")


@needs_devices
def test_zero_block():
  namespace = run_block("zero", problem())
  opt_state = namespace["opt_state"]
  assert_matches(namespace["trainer"], namespace["params"], opt_state,
                 optax.adamw(3e-4), "zero1")
  # "opt_state: 1/N per device": each moment buffer is split in 8 slices.
  for leaf in jax.tree.leaves((opt_state[0].mu, opt_state[0].nu)):
    assert leaf.addressable_shards[0].data.size * NUM_DEVICES == leaf.size
  # "the moments as a tree, like optax's".
  ref_mu = one_device(optax.adamw(3e-4))[1][0].mu
  assert jax.tree.structure(namespace["mu"]) == jax.tree.structure(ref_mu)
  chex.assert_trees_all_close(namespace["mu"], ref_mu, rtol=RTOL, atol=ATOL)


@needs_devices
def test_fsdp_block():
  namespace = run_block("fsdp", problem())
  params, opt_state = namespace["params"], namespace["opt_state"]
  assert_matches(namespace["trainer"], params, opt_state, optax.adamw(3e-4), "fsdp")
  # "params, state: 1/N per device": w1 (3, 8) and b1 (8,) split in 8; w2
  # (8, 1) too; nothing that 8 divides is replicated.
  for leaf in jax.tree.leaves((params, opt_state[0].mu, opt_state[0].nu)):
    assert leaf.addressable_shards[0].data.size * NUM_DEVICES == leaf.size


def test_skip_block():
  # The README leaves params and grads to the reader: a NaN in one element.
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  grads = {"w": jnp.ones((3, 2)).at[1, 0].set(jnp.nan), "b": jnp.ones(2)}
  namespace = {"jadam": jadam, "optax": optax, "params": params, "grads": grads}
  run_block("skip", namespace)
  state = namespace["state"]
  ref = optax.apply_if_finite(optax.adamw(3e-4, weight_decay=0.1), 2**31 - 1)
  assert jax.tree.structure(state) == jax.tree.structure(ref.init(params))
  assert int(optax.tree_utils.tree_get(state, "total_notfinite")) == 1
  assert_equal(namespace["updates"], jax.tree.map(jnp.zeros_like, params), "skip")
  assert_equal(state.inner_state, namespace["tx"].init(params).inner_state, "skip")


def test_master_weights_block():
  params = {"w": jnp.ones((128, 64), jnp.bfloat16), "b": jnp.zeros(64, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  namespace = {"jadam": jadam, "params": params, "grads": grads}
  # The block's first state, from the optimizer, before the functional core's.
  optimizer_state = jadam.adamw(1e-3, mu_dtype="q8", nu_dtype="q8",
                                master_weights="q8").init(params)
  assert isinstance(optimizer_state, jadam.MasterState)
  run_block("master weights", namespace)
  state = namespace["state"]
  assert state._fields == ("count", "mu", "nu", "master") and int(state.count) == 1
  for leaf, param in zip(jax.tree.leaves(state.master), jax.tree.leaves(params)):
    assert leaf.dtype == jnp.int8 and leaf.shape == param.shape
  # 1e-3 is below half of w's last place at 1 (2**-8): w stays, the master keeps the step.
  assert np.all(np.asarray(namespace["params"]["w"]) == 1)
  assert np.all(np.asarray(state.master["w"]) < 0)
  assert np.all(np.asarray(namespace["params"]["b"], np.float32) < 0)


@needs_devices
def test_loss_scale_block():
  namespace = problem()
  namespace["params"] = jax.tree.map(lambda x: x.astype(np.float16), namespace["params"])
  namespace["batch"] = jax.tree.map(lambda x: x.astype(np.float16), namespace["batch"])
  run_block("loss scale", namespace)
  trainer, opt_state = namespace["trainer"], namespace["opt_state"]
  assert isinstance(opt_state, jadam.LossScaleState)
  assert trainer.loss_scale(opt_state) in (2.0**15, 2.0**14)
  assert trainer.gather(namespace["params"])["w1"].dtype == np.float16
  assert np.isfinite(float(namespace["loss"]))


@needs_devices
def test_onebit_block():
  # The block builds the trainer; its first 2000 steps (the warm-up) are
  # exact Adam: one step equals one device's.
  namespace = run_block("onebit", problem())
  trainer = namespace["trainer"]
  assert trainer.strategy == "onebit"
  params, opt_state = trainer.init(namespace["params"])
  params, opt_state, _ = trainer.step(params, opt_state, namespace["batch"])
  assert_matches(trainer, params, opt_state, optax.adamw(3e-4), "onebit")


@needs_devices
def test_model_parallel_block():
  # The block uses NamedSharding and P without importing them; a reader
  # would have `from jax.sharding import NamedSharding, PartitionSpec as P`.
  namespace = problem()
  namespace.update(NamedSharding=jax.sharding.NamedSharding,
                   P=jax.sharding.PartitionSpec)
  run_block("model parallel", namespace)
  P = jax.sharding.PartitionSpec
  params, opt_state = namespace["params"], namespace["opt_state"]
  assert params["w1"].sharding.spec == P(None, "model")  # kept by init
  # "mu: shape (2, L), sharding P("model", "data")".
  for leaf in jax.tree.leaves((opt_state[0].mu, opt_state[0].nu)):
    assert leaf.ndim == 2 and leaf.shape[0] == 2, leaf.shape
    assert leaf.sharding.spec == P("model", "data")
  # One step of the trainer is one step of optax.lamb on one device.
  trainer = namespace["trainer"]
  params, opt_state, _ = trainer.step(params, opt_state, namespace["batch"])
  assert_matches(trainer, params, opt_state, optax.lamb(1e-3),
                 "zero2 over (data, model)")


@needs_devices
def test_memory_plan_block():
  namespace = run_block("memory plan", problem())
  plan = namespace["plan"]
  # The plan's optimizer-state bytes per device are what a zero2 trainer
  # with bfloat16 mu on 8 devices holds on device 0, padding included.
  trainer = jadam.parallel.DataParallel(
      _mp_worker.loss_fn, jadam.adam(1e-3, mu_dtype=jnp.bfloat16),
      namespace["mesh"], strategy="zero2")
  _, opt_state = trainer.init(namespace["params"])
  assert plan.opt_state == device0_bytes(opt_state)


@needs_devices
def test_checkpoint_block(tmp_path):
  namespace = problem()
  namespace.update(
      trainer=jadam.parallel.DataParallel(
          namespace["loss_fn"], jadam.adam(1e-3), namespace["mesh"],
          strategy="zero1"),
      batches=[namespace["batch"]] * 2, steps=2,
      # The block reads `step` in `range(step, steps)` before assigning it
      # when there is no checkpoint yet: a new run starts at 0.
      step=0)
  path = tmp_path / "run1"
  # The README's directory is an example; the test writes under tmp_path.
  run_block("checkpoint", namespace,
            replace=[('"/ckpt/run1"', repr(str(path)))])

  # Saved at step 0 (every 1000 steps), after that step's update: a new
  # Checkpointer and a new trainer read back one step of optax.adam.
  ckpt = jadam.checkpoint.Checkpointer(str(path))
  assert ckpt.latest_step() == 0
  trainer = jadam.parallel.DataParallel(
      _mp_worker.loss_fn, jadam.adam(1e-3), namespace["mesh"],
      strategy="zero1")
  trainer.init(_mp_worker.make_problem(steps=1)[0])
  step, params, opt_state = ckpt.restore(trainer)
  assert step == 0
  assert_matches(trainer, params, opt_state, optax.adam(1e-3),
                 "restored checkpoint")
