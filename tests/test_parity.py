"""Side-by-side parity of every jadam optimizer with the optax one of the same name."""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import jadam
from _trees import TREES, grad_sequence, nested_tree

# The drop-in's promise: optax's bits (XLA's ops), whatever $JADAM_KERNEL says.
pytestmark = pytest.mark.usefixtures("default_kernel_mode")

N_STEPS = 100


def decay_matrices(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


lr_schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 10, 100, 1e-3)
wd_schedule = optax.linear_schedule(0.2, 0.0, 100)

# name -> (optax factory, jadam factory): both called with the same arguments.
CONFIGS = {
    "adam": ("adam", dict(learning_rate=1e-2)),
    "adam_schedule": ("adam", dict(learning_rate=lr_schedule)),
    "adam_lr_array_eps_root": ("adam", dict(learning_rate=jnp.asarray(3e-3), eps_root=1e-8)),
    "nadam": ("nadam", dict(learning_rate=1e-2)),
    "adamw_mask": ("adamw", dict(learning_rate=1e-2, weight_decay=0.1, mask=decay_matrices)),
    "adamw_schedules": ("adamw", dict(learning_rate=lr_schedule, weight_decay=wd_schedule)),
    "nadamw": ("nadamw", dict(learning_rate=1e-2, weight_decay=0.05)),
    "amsgrad": ("amsgrad", dict(learning_rate=1e-2)),
    "amsgrad_no_bias_correction": (
        "amsgrad", dict(learning_rate=1e-2, bias_correction_mu=False, bias_correction_nu=False)),
    "adamax": ("adamax", dict(learning_rate=1e-2)),
    "adamaxw_mask": ("adamaxw", dict(learning_rate=1e-2, weight_decay=0.1, mask=decay_matrices)),
    "radam": ("radam", dict(learning_rate=1e-2)),
    "radam_nesterov": ("radam", dict(learning_rate=lr_schedule, nesterov=True, threshold=4.0)),
    "lamb_mask": ("lamb", dict(learning_rate=1e-2, weight_decay=0.1, mask=decay_matrices)),
    "scale_by_adam": ("scale_by_adam", dict(eps_root=1e-10, nesterov=True)),
}
# The wide tree's many leaves test the per-leaf parts: masks and LAMB's norms.
WIDE_CONFIGS = ["adamw_mask", "lamb_mask"]


def make(lib, name, **extra):
  fn, kwargs = CONFIGS[name]
  return getattr(lib, fn)(**kwargs, **extra)


def adam_like_state(state):
  """The moments part of an optax chain state (or a jadam state)."""
  for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")):
    if hasattr(s, "mu"):
      return s
  raise AssertionError(f"no moments in {state}")


def moments(state):
  """A state's count and moments (a flat state's unpacked into trees)."""
  s = adam_like_state(state)
  names = ["mu", "nu"] + (["nu_max"] if hasattr(s, "nu_max") else [])
  tree = lambda m: m.layout.unpack(m) if isinstance(m, jadam.Packed) else m  # noqa: E731
  return {"count": s.count, **{n: tree(getattr(s, n)) for n in names}}


def trajectory(tx, params, gseq):
  """Per-step (updates, params, moments) of ``N`` steps, in one compiled scan."""

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (u, p, moments(s))

  @jax.jit
  def run(params, gseq):
    _, hist = jax.lax.scan(body, (params, tx.init(params)), gseq)
    return hist

  return run(params, gseq)


# Every optimizer on the nested tree; a representative subset on the wide tree
# (its compile time dominates the suite).
@pytest.mark.parametrize(
    "tree, name", [("nested", n) for n in CONFIGS] + [("wide", n) for n in WIDE_CONFIGS])
def test_float32_parity_with_optax(tree, name):
  params = TREES[tree](jnp.float32)
  gseq = grad_sequence(params, N_STEPS)
  ref = trajectory(make(optax, name), params, gseq)
  got = trajectory(make(jadam, name), params, gseq)
  # Same operations in the same order: float32 results agree to rounding.
  chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=0)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, ref)
  chex.assert_tree_all_finite(jax.tree.leaves(got))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("case", ["bf16_params", "f32_params_bf16_moments"])
def test_low_precision_matches_optax_in_float32(name, case):
  """jadam stores bf16 params/moments but computes in float32.

  Reference: optax applied to the float32 upcast of the same params, grads and
  state, its outputs rounded to the stored dtypes — step by step (teacher
  forced), for 100 steps. Computing in float32 and rounding once at the end
  gives exactly that. (optax itself multiplies bf16 moments by the betas in
  bf16, and in float16 rounds eps to 0: an intended difference.)
  """
  if case == "bf16_params":
    params, extra = nested_tree(jnp.bfloat16), {}
  else:
    params, extra = nested_tree(jnp.float32), dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  gseq = grad_sequence(params, N_STEPS)
  tx_j, tx_o = make(jadam, name, **extra), make(optax, name)
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, t)
  down = lambda r, like: jax.tree.map(lambda a, b: a.astype(b.dtype), r, like)

  def body(carry, g):
    p, s = carry
    u, s_new = tx_j.update(g, s, p)
    ref_state = _load_moments(tx_o.init(up(p)), up(moments(s)))
    u_ref, s_ref = tx_o.update(up(g), ref_state, up(p))
    return (optax.apply_updates(p, u), s_new), (
        (u, moments(s_new)), (down(u_ref, u), down(moments(s_ref), moments(s_new))))

  @jax.jit
  def run(params, gseq):
    return jax.lax.scan(body, (params, tx_j.init(params)), gseq)[1]

  got, ref = run(params, gseq)
  for path, x in jax.tree_util.tree_leaves_with_path(got[1]):
    if "count" not in jax.tree_util.keystr(path):
      assert x.dtype == jnp.bfloat16, path  # moments stored in bf16
  assert all(x.dtype == params["scale"].dtype for x in jax.tree.leaves(got[0]))  # updates
  chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=0)
  chex.assert_tree_all_finite(got)


def _load_moments(optax_state, m):
  """Replaces the count and moments inside an optax chain state."""

  def fix(s):
    fields = getattr(s, "_fields", ())
    if "mu" in fields:
      return s._replace(**{k: v for k, v in m.items()})
    if "count" in fields:  # schedule counts
      return s._replace(count=m["count"])
    return s

  return jax.tree.map(fix, optax_state, is_leaf=lambda x: hasattr(x, "_fields"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jit_and_eager_agree(name):
  params = nested_tree()
  tx = make(jadam, name)
  update = jax.jit(tx.update)
  s_eager = s_jit = tx.init(params)
  p_eager = p_jit = params
  for i in range(8):
    g = jax.tree.map(lambda x: x[i], grad_sequence(params, 8))
    u_e, s_eager = tx.update(g, s_eager, p_eager)
    u_j, s_jit = update(g, s_jit, p_jit)
    p_eager, p_jit = optax.apply_updates(p_eager, u_e), optax.apply_updates(p_jit, u_j)
    # Eager calls run the same compiled update as jitted ones: equal to the bit.
    chex.assert_trees_all_equal((u_e, p_eager, s_eager), (u_j, p_jit, s_jit))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_functional_core_matches_optax_nadamw(dtype):
  """jadam.update / jadam.step (AdamW with Nesterov) against optax.nadamw.

  The reference is optax in float32 on the upcast inputs (for bf16 params,
  rounded to bf16): per step, from the same params and state.
  """
  params = nested_tree(dtype)
  kw = dict(learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1)
  tx = optax.nadamw(**kw)
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  ref_update = jax.jit(tx.update)
  update = jax.jit(lambda g, s, p: jadam.update(g, s, p, nesterov=True, **kw))
  # XLA's ops (on CPU "auto" runs jadam.step as the fused kernel, which rounds
  # every operation as written: tests/test_kernel.py holds it to a NumPy
  # reference bit for bit, and to optax to float32 rounding).
  step = jax.jit(lambda g, s, p: jadam.step(g, s, p, nesterov=True, kernel="xla", **kw))
  state, p = jadam.init(params), params
  gseq = grad_sequence(params, 30)
  eps32, ulp = 2.0**-23, jnp.finfo(dtype).eps
  for i in range(30):
    g = jax.tree.map(lambda x: x[i], gseq)
    s_ref = _load_moments(tx.init(up(p)), {"count": state.count, "mu": up(state.mu), "nu": up(state.nu)})
    u_ref, s_ref = ref_update(up(g), s_ref, up(p))
    u, new_state = update(g, state, p)
    chex.assert_trees_all_close(u, jax.tree.map(lambda a: a.astype(dtype), u_ref), rtol=1e-6, atol=0)
    chex.assert_trees_all_close(
        (new_state.mu, new_state.nu),
        jax.tree.map(lambda a: a.astype(dtype), (s_ref[0].mu, s_ref[0].nu)), rtol=1e-6, atol=0)
    # step = update + apply in one pass, rounded once: p + u may be fused
    # (one rounding fewer), so it is within an ulp of u plus one of the result.
    p_step, s_step = step(g, state, p)
    chex.assert_trees_all_equal(s_step, new_state)
    for a, pp, uu in zip(jax.tree.leaves(p_step), jax.tree.leaves(up(p)), jax.tree.leaves(u_ref)):
      want = pp + uu
      bound = eps32 * jnp.abs(uu) + ulp * jnp.abs(want)
      assert bool(jnp.all(jnp.abs(a.astype(jnp.float32) - want) <= bound)), (a, want)
    p, state = optax.apply_updates(p, u), new_state


@pytest.mark.parametrize(
    "fn", ["adam", "adamw", "amsgrad", "adamax", "adamaxw", "nadam", "nadamw", "radam",
           "lamb", "scale_by_adam"])
def test_signature_matches_optax(fn):
  """Same positional arguments, names, kinds and defaults as optax; extras keyword-only."""
  ours = inspect.signature(getattr(jadam, fn)).parameters
  theirs = inspect.signature(getattr(optax, fn)).parameters
  for name, p in theirs.items():
    assert name in ours, f"jadam.{fn} lacks optax argument {name}"
    q = ours[name]
    assert q.kind == p.kind, (fn, name, q.kind, p.kind)
    assert q.default == p.default, (fn, name, q.default, p.default)
    # optax's own annotation objects, not strings.
    assert q.annotation == p.annotation, (fn, name, q.annotation, p.annotation)
  assert list(ours)[: len(theirs)] == list(theirs)
  for name in list(ours)[len(theirs):]:
    assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY, (fn, name)
  assert "nu_dtype" in ours
