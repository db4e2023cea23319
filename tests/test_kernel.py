"""The fused multi-tensor Adam kernel (jadam._kernel) against the XLA path and optax."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _kernel
from _trees import grad_sequence, nested_tree, wide_tree
from test_parity import CONFIGS, make, moments

# kernel="fused" runs the kernel whatever $JADAM_KERNEL says ("auto" only).
pytestmark = pytest.mark.skipif(not _kernel.available(),
                                reason="the fused kernel is not built here (no C++ compiler)")

N_STEPS = 100


def odd_tree(dtype=jnp.float32, sizes=((513,), (3, 7, 11))):
  """Nested leaves (a scalar, a zero-size leaf, a None) plus odd sizes that
  split over the kernel's blocks (and with larger sizes its work items)."""
  rng = np.random.default_rng(3)
  tree = nested_tree(dtype)
  tree["odd"] = [jnp.asarray(rng.normal(size=s), dtype) for s in sizes]
  return tree


def custom_calls(fn, *args) -> int:
  return len(re.findall(r"custom-call\(", jax.jit(fn).lower(*args).compile().as_text()))


def teacher_forced(txs, params, gseq):
  """Per step, every optimizer in ``txs`` updates from the first one's params
  and state (so differences never compound): ``[(updates, moments)]`` each."""

  def body(carry, g):
    p, s = carry
    outs = []
    for tx in txs:
      state = s if tx is txs[0] else _as_state_of(tx, s, p)
      u, new = tx.update(g, state, p)
      outs.append((u, moments(new)))
      if tx is txs[0]:
        first = new
    return (optax.apply_updates(p, outs[0][0]), first), outs

  @jax.jit
  def run(params, gseq):
    return jax.lax.scan(body, (params, txs[0].init(params)), gseq)[1]

  return run(params, gseq)


def _as_state_of(tx, state, params):
  # optax's states and jadam's tree states are the same pytree; schedules'
  # counts and the moments are carried over.
  return jax.tree.unflatten(jax.tree.structure(tx.init(params)), jax.tree.leaves(state))


# Tolerance: the kernel rounds every operation of the rule as written; XLA:CPU
# contracts some multiply-adds into FMAs (which ones depends on the program),
# so values agree to float32 rounding, with cancellation in mu near zero.
CLOSE = dict(rtol=2e-6, atol=5e-8)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_matches_optax(name):
  """Every optimizer, 100 steps (the XLA path matches optax: test_parity.py)."""
  params = odd_tree()
  gseq = grad_sequence(params, N_STEPS)
  kernel, ref = teacher_forced([make(jadam, name, kernel="fused"), make(optax, name)],
                               params, gseq)
  chex.assert_trees_all_close(kernel, ref, **CLOSE)
  chex.assert_trees_all_equal_shapes_and_dtypes(kernel, ref)
  chex.assert_tree_all_finite(kernel)


@pytest.mark.parametrize("name", ["adamw_mask", "lamb_mask"])
def test_large_leaves_match_xla(name):
  """Leaves split over several work items (threads) and one shared with others."""
  params = odd_tree(sizes=((70001,), (300, 1000), (5,) * 1))
  gseq = grad_sequence(params, 4)
  kernel, xla = teacher_forced([make(jadam, name, kernel="fused"),
                                make(jadam, name, kernel="xla")], params, gseq)
  chex.assert_trees_all_close(kernel, xla, **CLOSE)


def test_tolerance_catches_a_wrong_rule():
  """The comparison above fails for a slightly different rule (b2 off by 1e-4)."""
  params = nested_tree()
  gseq = grad_sequence(params, 10)
  kernel, ref = teacher_forced([jadam.adam(1e-2, kernel="fused"), optax.adam(1e-2, b2=0.9991)],
                               params, gseq)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(kernel, ref, **CLOSE)


@pytest.mark.parametrize("name", ["adamw_mask", "lamb_mask"])
def test_flat_layout_matches_xla(name):
  """Packed buffers: masks and LAMB's per-leaf norms within a buffer."""
  params = wide_tree(n_leaves=60)
  gseq = grad_sequence(params, 30)
  kernel, xla = teacher_forced([make(jadam, name, layout="flat", kernel="fused"),
                                make(jadam, name, layout="flat", kernel="xla")], params, gseq)
  chex.assert_trees_all_close(kernel, xla, **CLOSE)


@pytest.mark.parametrize("case", ["bf16_params", "f16_params", "bf16_moments"])
@pytest.mark.parametrize("name", ["adamw_mask", "amsgrad"])
def test_low_precision_matches_xla(case, name):
  dtype = {"bf16_params": jnp.bfloat16, "f16_params": jnp.float16}.get(case, jnp.float32)
  extra = dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16) if case == "bf16_moments" else {}
  params = nested_tree(dtype)
  gseq = grad_sequence(params, 30)
  kernel, xla = teacher_forced([make(jadam, name, kernel="fused", **extra),
                                make(jadam, name, kernel="xla", **extra)], params, gseq)
  chex.assert_trees_all_equal_shapes_and_dtypes(kernel, xla)
  # Computed in float32 and rounded once to the stored dtype: at most one
  # rounding apart.
  eps = float(jnp.finfo(jnp.bfloat16 if case != "f16_params" else jnp.float16).eps)
  chex.assert_trees_all_close(kernel, xla, rtol=eps, atol=1e-6)


def test_step_applies_in_place_without_copies():
  """jadam.step with donated params and state: one kernel call, no copies."""
  params = odd_tree()
  state = jadam.init(params)
  grads = jax.tree.map(jnp.ones_like, params)

  def train_step(params, state, grads):
    return jadam.step(grads, state, params, learning_rate=1e-2, weight_decay=0.1,
                      kernel="fused")

  hlo = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, grads).compile().as_text()
  assert len(re.findall(r"custom-call\(", hlo)) == 1
  copied = [s for s in re.findall(r"= \w+\[([\d,]*)\]\S* copy\(", hlo)
            if np.prod([int(d) for d in s.split(",") if d] or [1]) > 0]
  assert not copied, f"donated buffers were copied: {copied}"
  new_p, new_s = jax.jit(train_step, donate_argnums=(0, 1))(params, state, grads)
  ref_p, ref_s = jax.jit(lambda p, s, g: jadam.step(
      g, s, p, learning_rate=1e-2, weight_decay=0.1, kernel="xla"))(
          odd_tree(), jadam.init(odd_tree()), grads)
  del ref_s
  chex.assert_trees_all_close(new_p, ref_p, **CLOSE)
  assert int(new_s.count) == 1


def test_one_call_per_group_of_leaves():
  """One kernel call per :data:`jadam._kernel.GROUP` leaves (XLA compiles a
  call in time quadratic in its aliased operands)."""
  params = wide_tree(n_leaves=300)
  tx = jadam.adam(1e-3, kernel="fused")
  want = -(-300 // _kernel.GROUP)
  assert custom_calls(tx.update, params, tx.init(params), params) == want


def test_vmap_and_grad_fall_back_to_xla():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  tx_k, tx_x = jadam.adamw(1e-2, kernel="fused"), jadam.adamw(1e-2, kernel="xla")

  def updates(tx, p, g):
    return tx.update(g, tx.init(p), p)[0]

  # vmap over a batch of params and grads: the XLA ops, vectorized.
  batch = lambda t: jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), t)
  got = jax.vmap(lambda p, g: updates(tx_k, p, g))(batch(params), batch(grads))
  for i in range(3):
    one = updates(tx_k, *(jax.tree.map(lambda x: x[i], t) for t in (batch(params), batch(grads))))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], got), one, **CLOSE)

  # grad through the step (e.g. a meta-learned learning rate).
  def loss(lr, tx_fn):
    tx = tx_fn(lr)
    new_p = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(new_p))

  g_k = jax.grad(loss)(1e-2, lambda lr: jadam.adamw(lr, kernel="fused"))
  g_x = jax.grad(loss)(1e-2, lambda lr: jadam.adamw(lr, kernel="xla"))
  chex.assert_trees_all_close(g_k, g_x, rtol=1e-6)
  del tx_x


@pytest.mark.parametrize("layout, tree", [("tree", nested_tree), ("flat", nested_tree),
                                          ("tree", wide_tree)])  # wide: several calls
def test_skip_nonfinite_in_the_kernel(layout, tree):
  params = tree()
  tx = jadam.adam(1e-2, skip_nonfinite=True, layout=layout, kernel="fused")
  ref = jadam.adam(1e-2, skip_nonfinite=True, layout=layout, kernel="xla")
  s, rs = tx.init(params), ref.init(params)
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  for t in range(6):
    g = jax.tree.map(lambda x: x * (t + 1.0), params)
    if t == 3:
      key = "dense" if "dense" in g else max(g)  # wide: a leaf of the last call
      g[key] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g[key])
    u, s = update(g, s, params)
    ru, rs = ref_update(g, rs, params)
    chex.assert_trees_all_close((u, s), (ru, rs), **CLOSE)
  assert int(adam_count(s)) == 5  # the NaN step was skipped


def adam_count(state):
  return moments(state)["count"]


def test_auto_falls_back_where_the_kernel_cannot_run(monkeypatch):
  monkeypatch.setenv("JADAM_KERNEL", "fused")  # "auto": the kernel where it can run
  params = {"w": jnp.ones((64, 80))}
  tx = jadam.adam(1e-3)
  assert custom_calls(tx.update, params, tx.init(params), params) == 1
  low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  master = jadam.lamb(1e-3, master_weights="float32")
  assert custom_calls(master.update, low, master.init(low), low) == 0  # XLA path
  forced = jadam.lamb(1e-3, master_weights="float32", kernel="fused")
  with pytest.raises(ValueError, match="LAMB with master weights"):
    forced.update(low, forced.init(low), low)
  with pytest.raises(ValueError, match="kernel"):
    jadam.adam(1e-3, kernel="cuda")


def test_env_var_and_missing_compiler(tmp_path):
  """kernel="auto" is the XLA path by default and the kernel with
  JADAM_KERNEL=fused; without a compiler the step runs on the XLA path after
  a one-line notice (fresh processes)."""
  code = ("import jax, jax.numpy as jnp, re, jadam\n"
          "p = {'w': jnp.ones(5)}\n"
          "tx = jadam.adam(1e-2)\n"
          "hlo = jax.jit(tx.update).lower(p, tx.init(p), p).compile().as_text()\n"
          "print('calls', len(re.findall(r'custom-call\\(', hlo)))\n"
          "print('ok', float(tx.update(p, tx.init(p), p)[0]['w'][0]))\n")
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
  base.pop("JADAM_KERNEL", None)
  default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=base, timeout=120, check=True)
  assert "calls 0" in default.stdout
  fused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(base, JADAM_KERNEL="fused"), timeout=120, check=True)
  assert "calls 1" in fused.stdout
  no_cxx = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(base, JADAM_KERNEL="fused", JADAM_CACHE_DIR=str(tmp_path),
                                   CXX="/nonexistent",
                                   PATH=os.path.dirname(sys.executable)),
                          timeout=120, check=True)
  assert "calls 0" in no_cxx.stdout and "ok -0.0099999" in no_cxx.stdout
  assert no_cxx.stderr.count("fused Adam kernel unavailable") == 1


# ------------------------------------------------ bit for bit: a NumPy reference

from jadam import _rule, _segments, _update  # noqa: E402  pylint: disable=wrong-import-position
from jadam._kernel import _ffi  # noqa: E402  pylint: disable=wrong-import-position
import _np_adam  # noqa: E402  pylint: disable=wrong-import-position

NP_RULES = {
    "adam": _rule.Rule(kernel="fused"),
    "nadam": _rule.Rule(nesterov=True, kernel="fused"),
    "amsgrad": _rule.Rule(kind="amsgrad", kernel="fused"),
    "adamax": _rule.Rule(kind="adamax", kernel="fused"),
    "radam": _rule.Rule(kind="radam", kernel="fused"),
    "nradam": _rule.Rule(kind="radam", nesterov=True, kernel="fused"),
    # 1-bit Adam after its warm-up: nu frozen (at step 3 here), read, not updated.
    "adam_frozen": _rule.Rule(nu_frozen_at=3, kernel="fused"),
    "amsgrad_frozen": _rule.Rule(kind="amsgrad", nu_frozen_at=3, kernel="fused"),
    "adamax_frozen": _rule.Rule(kind="adamax", nu_frozen_at=3, kernel="fused"),
}


def whole_leaf_kernel_step(rule, hp, decay, apply, out_dtypes):
  """A jitted ``(count, grads, moments, params) -> (scalars, count, results)``:
  one kernel call over whole-leaf chunks (``moments[k][i]``: moment k of leaf
  i), with the float32 scalars the kernel got, for a NumPy reference to use."""

  @jax.jit
  def kernel_step(count, grads, moments, params):
    chunks = [_update.Chunk(g, tuple(m[i] for m in moments), p, _segments.WHOLE, (d,))
              for i, (g, p, d) in enumerate(zip(grads, params, decay))]
    hp_t, _, scalars = _update.step_inputs(rule, hp, count)
    # pylint: disable-next=protected-access
    vector = _kernel._scalar_vector(hp_t, scalars, use_wd=True, scale_lr=True)
    new_count, results, _ = _kernel.update_and_finish(
        rule, hp, count, chunks, use_wd=True, scale_lr=True, apply="fused" if apply else None,
        out_dtypes=out_dtypes)
    return vector, new_count, results

  return kernel_step


@pytest.mark.parametrize("apply", [False, True])
@pytest.mark.parametrize("name", list(NP_RULES))
def test_bit_identical_to_a_numpy_float32_reference(name, apply):
  """The kernel's promise, checked bit for bit: every operation of the rule in
  its order, rounded to float32 (as NumPy computes it), for 8 teacher-forced
  steps (RAdam's rectification turns on after 5), with weight decay masked
  on one leaf, odd sizes over several work items, float32 and bfloat16 params."""
  rule = NP_RULES[name]
  hp = _rule.Hyper(learning_rate=3e-3, b1=0.9, b2=0.99, eps=1e-8, eps_root=1e-12,
                   weight_decay=0.05)
  rng = np.random.default_rng(7)
  sizes, dtypes = (70001, 513, 1, 64), (jnp.float32, jnp.float32, jnp.bfloat16, jnp.float32)
  decay = (True, False, True, True)
  params = [jnp.asarray(rng.normal(size=n), d) for n, d in zip(sizes, dtypes)]
  moments = [[jnp.asarray(np.abs(rng.normal(size=n)) * 1e-3, jnp.float32) for n in sizes]
             for _ in rule.moment_names]
  out_dtypes = [p.dtype if apply else jnp.float32 for p in params]

  kernel_step = whole_leaf_kernel_step(rule, hp, decay, apply, out_dtypes)

  count = jnp.asarray(0, jnp.int32)
  for _ in range(8):
    grads = [jnp.asarray(rng.normal(size=n) * 1e-2, jnp.float32) for n in sizes]
    vector, count, results = kernel_step(count, grads, moments, params)
    scalars = dict(zip(_ffi.SCALARS, np.asarray(vector)))
    for i, (out, new_moments) in enumerate(results):
      ref_out, ref_moments = _np_adam.step(
          rule.kind, rule.nesterov, scalars, grads[i], [m[i] for m in moments], params[i],
          decay[i], apply, frozen=bool(rule.nu_frozen_at))
      np.testing.assert_array_equal(np.asarray(out), ref_out, err_msg=f"leaf {i}")
      for got, ref in zip(new_moments, ref_moments):
        np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"leaf {i} moments")
    moments = [[r[1][j] for r in results] for j in range(len(rule.moment_names))]
    if apply:
      params = [r[0] for r in results]
  assert int(count) == 8


# ------------------------------------------------ the default: in-place steps


def test_auto_runs_the_kernel_for_in_place_steps(monkeypatch):
  """Unset $JADAM_KERNEL: jadam.step (tree or packed params) runs the kernel,
  the optax drop-in's update XLA's ops (its updates stay optax's bits)."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)
  params = odd_tree()
  grads = jax.tree.map(jnp.ones_like, params)

  def step(p, s, g):
    return jadam.step(g, s, p, learning_rate=1e-2)

  assert custom_calls(step, params, jadam.init(params), grads) == 1
  layout = jadam.FlatLayout.from_tree(params)
  packed, packed_g = layout.pack(params), layout.pack(grads)
  assert custom_calls(step, packed, jadam.init(packed), packed_g) == 1
  tx = jadam.adam(1e-2)
  assert custom_calls(tx.update, params, tx.init(params), params) == 0
  monkeypatch.setenv("JADAM_KERNEL", "xla")  # read when a step is traced: a new function
  assert custom_calls(lambda p, s, g: jadam.step(g, s, p), params, jadam.init(params),
                      grads) == 0
  monkeypatch.setenv("JADAM_KERNEL", "cuda")
  with pytest.raises(ValueError, match="JADAM_KERNEL"):
    jadam.step(grads, jadam.init(params), params)


def test_auto_on_a_gspmd_mesh(monkeypatch):
  """Arrays of a mesh that GSPMD splits: "auto" runs the kernel on each
  device's shard (its partitioning rule: tests/test_kernel_partition.py),
  without gathering them; XLA's ops for LAMB, which needs whole leaves;
  inside shard_map the arrays are local and it runs as on one device."""
  monkeypatch.setenv("JADAM_KERNEL", "fused")
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  params = {"w": jax.device_put(jnp.ones((8, 3)), sharding)}

  def step(p, s, g):
    return jadam.step(g, s, p)

  hlo = jax.jit(step).lower(params, jadam.init(params), params).compile().as_text()
  assert len(re.findall(r"custom-call\(", hlo)) == 1 and "all-gather" not in hlo
  lamb = jadam.lamb(1e-3)
  assert custom_calls(lamb.update, params, lamb.init(params), params) == 0
  with jax.set_mesh(mesh):
    local = {"w": jnp.ones((8, 3))}
    assert custom_calls(step, local, jadam.init(local), local) == 1
    assert custom_calls(lamb.update, local, lamb.init(local), local) == 0
  state = jadam.init(params)
  specs = jax.tree.map(lambda x: jax.sharding.PartitionSpec(*(("d",) if x.ndim else ())),
                       (params, state, params))
  in_shard_map = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=specs[:2])
  assert custom_calls(in_shard_map, params, state, params) == 1


# ------------------------------------------------ ZeRO's slice update


def regression_problem():
  """``(params, x, y, mesh)``: a small tanh regression over all devices."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(16, 33)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(33,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  return params, x, y, jax.make_mesh((jax.device_count(),), ("data",))


def regression_loss(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]).sum(-1) - y) ** 2)


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero_slice_update_runs_the_kernel(strategy):
  """Each device's slices of the packed buffers go through the kernel inside
  the strategy's shard_map; a NaN batch is skipped on every device (the flag
  reduced with the loss); results agree with the XLA path."""
  from jadam import parallel  # pylint: disable=import-outside-toplevel
  params, x, y, mesh = regression_problem()
  runs = {}
  for kernel in ("fused", "xla"):
    tx = jadam.adamw(1e-2, weight_decay=0.1, skip_nonfinite=True, kernel=kernel)
    trainer = parallel.DataParallel(regression_loss, tx, mesh, strategy=strategy)
    p, s = trainer.init(params)
    calls = len(re.findall(r"custom-call\(", trainer.lower(p, s, (x, y)).compile().as_text()))
    assert calls == (1 if kernel == "fused" else 0)
    for t in range(4):
      p, s, _ = trainer.step(p, s, (x.at[3, 3].set(jnp.nan) if t == 2 else x, y))
    runs[kernel] = (p, s)
  chex.assert_trees_all_close(*(jax.tree.map(np.asarray, runs[k]) for k in ("fused", "xla")),
                              **CLOSE)
  assert int(optax.tree_utils.tree_get(runs["fused"][1], "count")) == 3  # one step skipped
  masked = jadam.adamw(1e-2, weight_decay=0.1, mask={"w": True, "b": False}, kernel="fused")
  trainer = parallel.DataParallel(regression_loss, masked, mesh, strategy=strategy)
  p, s = trainer.init(params)
  with pytest.raises(ValueError, match="weight decay mask"):
    trainer.step(p, s, (x, y))
