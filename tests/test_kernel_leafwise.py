"""The flat layout's tree-in/tree-out step on the kernel (jadam._kernel._leafwise):
gradients read from their leaves, updates written as leaves, moments updated
at their offsets in the packed buffers: no pack, no unpack."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _kernel
from jadam._kernel import _ffi
from _trees import adam_node, grad_sequence, nested_tree
from test_kernel import CLOSE, N_STEPS, teacher_forced
from test_parity import make, moments, trajectory

pytestmark = pytest.mark.skipif(not _kernel.available(),
                                reason="the fused kernel is not built here (no C++ compiler)")

# Every rule the leafwise step runs (LAMB's trust ratio takes the packed
# kernel), with masks, schedules and the optax-style scale_by_adam.
NAMES = ["adam_schedule", "nadamw", "adamw_mask", "amsgrad", "adamaxw_mask", "radam_nesterov",
         "scale_by_adam"]


def many_leaves(dtype=jnp.float32, n: int = 70):
  """More leaves in one buffer than one kernel call takes (GROUP = 64), a
  leaf large enough for a buffer of its own, None, a scalar and a zero-size
  leaf (nested_tree)."""
  rng = np.random.default_rng(5)
  tree = nested_tree(dtype)
  tree["many"] = [jnp.asarray(rng.normal(size=(i % 7 + 1, 3)), dtype) for i in range(n)]
  tree["big"] = jnp.asarray(rng.normal(size=(40001,)), dtype)
  return tree


@pytest.mark.parametrize("name", NAMES)
def test_bit_identical_to_the_tree_kernel(name):
  """The tree layout's kernel runs the same float32 operations per element
  (tests/test_kernel.py holds it to a NumPy reference): updates, params and
  moments agree bit for bit over 12 steps (RAdam's rectification turns on,
  zero gradients at step 4), masks included. (On 8 small leaves: the tests
  below run more than one kernel call takes.)"""
  params = many_leaves(n=8)
  gseq = grad_sequence(params, 12)
  chex.assert_trees_all_equal(
      trajectory(make(jadam, name, layout="flat", kernel="fused"), params, gseq),
      trajectory(make(jadam, name, kernel="fused"), params, gseq))


@pytest.mark.parametrize("case", ["bf16_params", "bf16_moments"])
def test_low_precision_bit_identical_to_the_tree_kernel(case):
  dtype = jnp.bfloat16 if case == "bf16_params" else jnp.float32
  extra = dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16) if case == "bf16_moments" else {}
  params = many_leaves(dtype)
  gseq = grad_sequence(params, 8)
  chex.assert_trees_all_equal(
      trajectory(make(jadam, "adamw_mask", layout="flat", kernel="fused", **extra), params, gseq),
      trajectory(make(jadam, "adamw_mask", kernel="fused", **extra), params, gseq))


def test_close_to_the_xla_path():
  """Against the XLA path's pack, buffer step and unpack (held to optax in
  tests/test_flat.py): to float32 rounding, 100 teacher-forced steps."""
  params = many_leaves()
  gseq = grad_sequence(params, N_STEPS)
  kernel, xla = teacher_forced([jadam.adam(1e-2, layout="flat", kernel="fused"),
                                jadam.adam(1e-2, layout="flat", kernel="xla")], params, gseq)
  chex.assert_trees_all_close(kernel, xla, **CLOSE)


def _hlo(tx, params):
  grads = jax.tree.map(jnp.ones_like, params)
  return jax.jit(tx.update).lower(grads, tx.init(params), params).compile().as_text()


def _packing(hlo: str) -> tuple[int, int]:
  """The concatenates of more operands than the kernel's scalars (a pack),
  and the slices (an unpack's, one per leaf) in an HLO text."""
  concats = [c for c in re.findall(r" concatenate\(([^)]*)\)", hlo)
             if c.count(",") + 1 > len(_ffi.SCALARS)]
  return len(concats), len(re.findall(r" slice\(", hlo))


def test_auto_reads_and_writes_the_leaves(monkeypatch):
  """Unset $JADAM_KERNEL: a buffer of several leaves steps them on the
  kernel, one call per 64 leaves, with no concatenate of the gradients and no
  slice of the updates; a leaf with a buffer of its own stays XLA's ops;
  JADAM_KERNEL=xla never calls the kernel."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)
  params = many_leaves()
  n_small = len(jax.tree.leaves(params)) - 1 - 1  # the large leaf and the zero-size one
  hlo = _hlo(jadam.adam(1e-3, layout="flat"), params)
  # (The large leaf's buffer stays XLA's: one fused pass, neither copied nor sliced.)
  assert len(re.findall(r"custom-call\(", hlo)) == -(-n_small // _kernel.GROUP)
  assert _packing(hlo) == (0, 1)  # the large leaf's padding sliced off (fused)
  xla = _hlo(jadam.adam(1e-3, layout="flat", kernel="xla"), params)
  assert "custom-call(" not in xla and _packing(xla) == (1, n_small + 1)

  one = {"w": jnp.linspace(-1.0, 1.0, 40001)}
  assert "custom-call(" not in _hlo(jadam.adam(1e-3, layout="flat"), one)
  gseq = grad_sequence(one, 5)
  chex.assert_trees_all_equal(trajectory(jadam.adam(1e-2, layout="flat"), one, gseq),
                              trajectory(jadam.adam(1e-2, layout="flat", kernel="xla"), one, gseq))

  monkeypatch.setenv("JADAM_KERNEL", "xla")  # read when a step is traced
  assert "custom-call(" not in _hlo(jadam.adam(2e-3, layout="flat"), params)


def test_skip_nonfinite_over_several_calls():
  """A NaN in the last group's leaf skips the whole step (every call), then
  an inf in the first group's; a finite step after them is taken."""
  params = many_leaves()
  tx = jadam.adam(1e-2, layout="flat", skip_nonfinite=True, kernel="fused")
  ref = jadam.adam(1e-2, layout="flat", skip_nonfinite=True, kernel="xla")
  step = jax.jit(lambda tx, g, s, p: tx.update(g, s, p), static_argnums=0)
  s, rs = tx.init(params), ref.init(params)
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  s, rs = step(tx, g, s, params)[1], step(ref, g, rs, params)[1]
  for where, bad in (("many", jnp.nan), ("dense", jnp.inf)):
    leaves = {"many": lambda t: t["many"][-1], "dense": lambda t: t["dense"]["w"]}[where]
    bad_g = jax.tree.map(lambda x: x, g)
    target = leaves(bad_g)
    poisoned = target.at[0].set(bad)
    if where == "many":
      bad_g["many"][-1] = poisoned
    else:
      bad_g["dense"]["w"] = poisoned
    u, new = step(tx, bad_g, s, params)
    chex.assert_trees_all_equal(moments(new), moments(s))
    assert int(adam_node(new).count) == int(adam_node(s).count) == 1
    assert int(new.notfinite_count) == 1
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  u, s = step(tx, g, s, params)
  ru, rs = step(ref, g, rs, params)
  assert int(adam_node(s).count) == 2
  chex.assert_trees_all_close(u, ru, rtol=2e-6, atol=5e-8)


def test_vmap_and_grad_fall_back_to_xla():
  """Under vmap (an ensemble of optimizers) the XLA path, vectorized; jax.grad
  through the step (a meta-learned learning rate) is the XLA path's."""
  params = many_leaves(n=5)
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  tx = jadam.adamw(1e-2, weight_decay=0.1, layout="flat", kernel="fused")

  def updates(p, g):
    return tx.update(g, tx.init(p), p)[0]

  batch = lambda t: jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), t)
  got = jax.vmap(updates)(batch(params), batch(grads))
  for i in range(3):
    one = updates(*(jax.tree.map(lambda x: x[i], t) for t in (batch(params), batch(grads))))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], got), one, rtol=2e-6, atol=5e-8)

  def loss(lr, kernel):
    t = jadam.adamw(lr, weight_decay=0.1, layout="flat", kernel=kernel)
    new_p = optax.apply_updates(params, t.update(grads, t.init(params), params)[0])
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(new_p))

  chex.assert_trees_all_close(jax.grad(loss)(1e-2, "fused"), jax.grad(loss)(1e-2, "xla"),
                              rtol=1e-6)


def test_overlapping_leaves_are_refused():
  """Two leaves' moments at overlapping offsets of the shared buffers would
  be written by two threads at once: the kernel refuses the call."""
  g = [jnp.ones(8), jnp.ones(8)]
  mu, nu = jnp.zeros(16), jnp.zeros(16)
  scalars = jnp.zeros(len(_ffi.SCALARS), jnp.float32)
  common = dict(kind="adam", nesterov=False, n_moments=2, has_param=False, mode="update",
                scale_lr=True, skip=0, wd_ranges=[[], []], out_dtypes=[jnp.float32] * 2)
  ok = _ffi.step(scalars, [(x, (), None) for x in g], shared=((mu, nu), [0, 8]), **common)
  jax.block_until_ready(ok)
  with pytest.raises(Exception, match="overlap"):
    jax.block_until_ready(_ffi.step(scalars, [(x, (), None) for x in g],
                                    shared=((mu, nu), [0, 4]), **common))
  with pytest.raises(Exception, match="unsupported buffers"):  # past the buffers' end
    jax.block_until_ready(_ffi.step(scalars, [(x, (), None) for x in g],
                                    shared=((mu, nu), [0, 9]), **common))
