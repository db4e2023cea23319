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
      key = "dense" if "dense" in g else "layer_199"
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
  q8 = jadam.adam(1e-3, mu_dtype="q8", nu_dtype="q8")
  assert custom_calls(q8.update, params, q8.init(params), params) == 0  # XLA path
  forced = jadam.adam(1e-3, mu_dtype="q8", nu_dtype="q8", kernel="fused")
  with pytest.raises(ValueError, match="quantized moments"):
    forced.update(params, forced.init(params), params)
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
