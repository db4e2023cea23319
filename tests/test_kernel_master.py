"""The fused kernel with master weights (``master_weights="float32"`` and
``"q8"``): bit for bit against a NumPy float32 reference, against the XLA
path through the optimizers, the tree and flat layouts and ZeRO, skipped
steps, and what stays on XLA's ops."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _kernel, _rule
from jadam._kernel import _ffi
import _np_adam
from test_kernel import regression_loss, regression_problem, whole_leaf_kernel_step

pytestmark = pytest.mark.skipif(not _kernel.available(),
                                reason="the fused kernel is not built here (no C++ compiler)")

RULES = {"adam": _rule.Rule(kernel="fused"), "nadam": _rule.Rule(nesterov=True, kernel="fused"),
         "amsgrad": _rule.Rule(kind="amsgrad", kernel="fused")}


def custom_calls(fn, *args) -> int:
  return len(re.findall(r"custom-call\(", jax.jit(fn).lower(*args).compile().as_text()))


@pytest.mark.parametrize("apply", [False, True])
@pytest.mark.parametrize("fmt,name", [("float32", "adam"), ("q8", "nadam"), ("q8", "amsgrad")])
def test_bit_identical_to_a_numpy_float32_reference(fmt, name, apply):
  """Updates (the param's change), new params and master state bit for bit
  those of NumPy's float32 decode, step and rounding, for 6 teacher-forced
  steps: bfloat16 params over several work items, float16 and float32 ones,
  one element, weight decay (on the master value) masked on one leaf, and
  updates far below a bfloat16 param's last place, which only the master
  state keeps."""
  rule = _rule.Rule(kind=RULES[name].kind, nesterov=RULES[name].nesterov, master=fmt,
                    kernel="fused")
  hp = _rule.Hyper(learning_rate=1e-4, b1=0.9, b2=0.99, eps=1e-8, eps_root=0.0,
                   weight_decay=0.05)
  rng = np.random.default_rng(13)
  sizes = (70001, 513, 300, 1)
  dtypes = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.bfloat16)
  decay = (True, False, True, True)
  params = [jnp.asarray(rng.normal(size=n), d) for n, d in zip(sizes, dtypes)]
  moments = [[jnp.asarray(np.abs(rng.normal(size=n)) * 1e-3, jnp.float32) for n in sizes]
             for _ in rule.optax_names]
  state_dtype = np.float32 if fmt == "float32" else np.int8
  moments.append([jnp.zeros(n, state_dtype) for n in sizes])  # the master state
  out_dtypes = [p.dtype if apply else jnp.float32 for p in params]

  kernel_step = whole_leaf_kernel_step(rule, hp, decay, apply, out_dtypes)
  count = jnp.asarray(0, jnp.int32)
  kept = 0
  for step in range(6):
    grads = [jnp.asarray(rng.normal(size=n) * 1e-2, jnp.float32) for n in sizes]
    vector, count, results = kernel_step(count, grads, moments, params)
    scalars = dict(zip(_ffi.SCALARS, np.asarray(vector)))
    for i, (out, new_moments) in enumerate(results):
      old = [np.asarray(m[i]) for m in moments]
      ref_out, ref_moments = _np_adam.step(rule.kind, rule.nesterov, scalars, grads[i], old[:-1],
                                           np.asarray(params[i]), decay[i], apply,
                                           master=(fmt, old[-1]))
      where = f"step {step} leaf {i}"
      np.testing.assert_array_equal(np.asarray(out), ref_out, err_msg=where)
      assert np.asarray(out).dtype == ref_out.dtype
      for k, (got, ref) in enumerate(zip(new_moments, ref_moments)):
        np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"{where} moment {k}")
      kept += int(np.count_nonzero(np.asarray(new_moments[-1])))
    moments = [[r[1][k] for r in results] for k in range(len(rule.moment_names))]
    if apply:
      params = [r[0] for r in results]
  assert int(count) == 6
  assert kept > 1000  # the master state holds what the params could not


# ------------------------------------------- through the optimizers and layouts

CLOSE = dict(rtol=2e-6, atol=5e-8)  # float32 rounding (as tests/test_kernel.py)


def bf16_tree():
  rng = np.random.default_rng(5)
  return {"w": jnp.asarray(rng.normal(size=(96, 80)), jnp.bfloat16),
          "b": jnp.asarray(rng.normal(size=(5000,)), jnp.bfloat16),
          "h": jnp.asarray(rng.normal(size=(10,)), jnp.float16)}


def master_states(state) -> list:
  return jax.tree.leaves(optax.tree_utils.tree_get(state, "master"))


def assert_masters_agree(got, want, fmt):
  """Master states from the same start: float32 differences to float32
  rounding of the master value; q8 corrections within one (a value on the
  boundary between two can round either way). Returns how many differ."""
  differ = 0
  for a, b in zip(master_states(got), master_states(want)):
    a, b = np.asarray(a), np.asarray(b)
    if fmt == "float32":
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    else:
      assert np.max(np.abs(a.astype(np.int32) - b.astype(np.int32))) <= 1
    differ += int(np.count_nonzero(a != b))
  return differ


@pytest.mark.parametrize("fmt", ["float32", "q8"])
@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_master_updates_agree_with_the_xla_path(layout, fmt):
  """``jadam.adamw(master_weights=...)`` on bfloat16 and float16 params with
  the kernel forced, in the tree layout and the flat one: one kernel call per
  step, and from the same state and gradient (teacher-forced, 5 steps) the
  XLA path's new params bit for bit but for a rare last-place tie, its
  updates to float32 rounding and its master state as above."""
  params = bf16_tree()
  txs = {k: jadam.adamw(1e-3, weight_decay=0.1, mu_dtype=jnp.float32, nu_dtype=jnp.float32,
                        master_weights=fmt, layout=layout, kernel=k)
         for k in ("fused", "xla")}
  state = txs["xla"].init(params)
  assert len(master_states(state)) == (3 if layout == "tree" else 2)
  assert custom_calls(txs["fused"].update, params, state, params) == 1
  assert custom_calls(txs["xla"].update, params, state, params) == 0
  updates = {k: jax.jit(tx.update) for k, tx in txs.items()}
  rng = np.random.default_rng(6)
  for _ in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-2, x.dtype), params)
    (uf, sf), (ux, sx) = (updates[k](g, state, params) for k in ("fused", "xla"))
    pf, px = (optax.apply_updates(params, u) for u in (uf, ux))
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(px)):
      assert a.dtype == b.dtype and a.dtype != jnp.float32
      assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=0, atol=float(jnp.abs(b).max()) * 1e-2),
                 uf, ux)
    assert_masters_agree(sf, sx, fmt)
    state, params = sx, px


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_master_skipped_step_leaves_everything_as_it_was(layout):
  """``skip_nonfinite`` with q8 master weights and q8 moments in the kernel
  (bfloat16 params, the tree and flat layouts: the 7-bytes-per-param state):
  a NaN, then an inf, in one gradient element returns zero updates and the
  master state, codes, scales and counts bit for bit as they were."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), bf16_tree())
  tx = jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q8", master_weights="q8", skip_nonfinite=True,
                  layout=layout, kernel="fused")
  state = tx.init(params)
  assert custom_calls(tx.update, params, state, params) == 1
  update = jax.jit(tx.update)
  g = jax.tree.map(lambda x: jnp.full(x.shape, 1e-2, x.dtype), params)
  u, state = update(g, state, params)
  params = optax.apply_updates(params, u)
  assert any(np.any(np.asarray(m)) for m in master_states(state))
  for bad in (jnp.nan, jnp.inf):
    leaves, treedef = jax.tree.flatten(g)
    leaves[0] = leaves[0].reshape(-1).at[17].set(bad).reshape(leaves[0].shape)
    before = jax.tree.map(np.asarray, state)
    u, state = update(jax.tree.unflatten(treedef, leaves), state, params)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    after = jax.tree.map(np.asarray, state)
    for k in ("notfinite_count", "total_notfinite"):  # apply_if_finite's counters
      assert (int(optax.tree_utils.tree_get(after, k))
              == int(optax.tree_utils.tree_get(before, k)) + 1)
    kept = [jax.tree.leaves(st.inner_state) for st in (after, before)]  # master, moments, count
    assert len(kept[0]) >= 6
    jax.tree.map(np.testing.assert_array_equal, *kept)
  u, state = update(g, state, params)
  assert int(optax.tree_utils.tree_get(state, "count")) == 2  # the two bad steps not counted


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero_slices_with_master_weights_run_the_kernel(strategy):
  """ZeRO on 8 devices with bfloat16 params and q8 master weights (the
  correction sharded like the moments): one custom call per step, and from
  the same state and batch (teacher-forced) the XLA path's params to one
  bfloat16 last place on a rare tie, its master state within one."""
  from jadam import parallel  # pylint: disable=import-outside-toplevel
  params, x, y, mesh = regression_problem()
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  trainers = {}
  for kernel in ("fused", "xla"):
    tx = jadam.adamw(1e-2, weight_decay=0.1, master_weights="q8", kernel=kernel)
    trainers[kernel] = parallel.DataParallel(regression_loss, tx, mesh, strategy=strategy)
  p, s = trainers["xla"].init(params)
  assert master_states(s)
  for kernel, want in (("fused", 1), ("xla", 0)):
    hlo = trainers[kernel].lower(p, s, (x, y)).compile().as_text()
    assert len(re.findall(r"custom-call\(", hlo)) == want
  for _ in range(4):
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # pylint: disable=unnecessary-lambda-assignment
    pf, sf, _ = trainers["fused"].step(copy(p), copy(s), (x, y))
    px, sx, _ = trainers["xla"].step(p, s, (x, y))
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(px)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.mean(a != b) < 1e-2
      np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=0)
    assert_masters_agree(sf, sx, "q8")
    p, s = px, sx


def test_lamb_with_master_weights_stays_on_the_xla_path(monkeypatch):
  """LAMB's trust ratio needs the master values' norms before its second
  pass: "auto" runs it as XLA ops, "fused" says why it cannot."""
  monkeypatch.setenv("JADAM_KERNEL", "fused")  # "auto": the kernel wherever it can run
  low = {"w": jnp.ones((64, 80), jnp.bfloat16)}
  lamb = jadam.lamb(1e-3, master_weights="q8")
  assert custom_calls(lamb.update, low, lamb.init(low), low) == 0
  adam = jadam.adam(1e-3, master_weights="q8")
  assert custom_calls(adam.update, low, adam.init(low), low) == 1
  forced = jadam.lamb(1e-3, master_weights="q8", kernel="fused")
  with pytest.raises(ValueError, match="LAMB with master weights"):
    forced.update(low, forced.init(low), low)


def test_auto_runs_the_kernel_for_q8_master_drop_in_updates(monkeypatch):
  """Unset $JADAM_KERNEL: the drop-in's update runs the kernel with q8 master
  weights (XLA's frexp and ldexp of every param are the slower path), XLA's
  ops with float32 master weights and float moments (XLA fuses the update
  into ``p + u``); ``jadam.step`` runs the kernel with either."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)
  low = {"w": jnp.ones((64, 80), jnp.bfloat16)}
  for master, want in (("q8", 1), ("float32", 0)):
    tx = jadam.adam(1e-3, master_weights=master)
    assert custom_calls(tx.update, low, tx.init(low), low) == want
    state = jadam.init(low, master_weights=master)
    assert custom_calls(jadam.step, low, state, low) == 1
