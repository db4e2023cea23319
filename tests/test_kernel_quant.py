"""The fused kernel with block-wise quantized moments (q8, q4's mu): bit for
bit against a NumPy float32 reference, against the XLA path in the tree and
flat layouts and under ZeRO, skipped steps, and what stays on XLA's ops."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _kernel, _quant, _rule, _segments, _update
from jadam._kernel import _ffi
import _np_adam
import _np_quant
from test_kernel import regression_loss, regression_problem, whole_leaf_kernel_step

pytestmark = pytest.mark.skipif(not _kernel.available(),
                                reason="the fused kernel is not built here (no C++ compiler)")

Q = _quant.Quantized
# (mu format, nu format): the q8 defaults, q4's block-wise mu (and a
# block-wise 4-bit nu), linear maps with a block larger than the kernel's own
# (4096) and the smallest (16).
FORMATS = {
    "q8": (_quant.for_moment("q8", "mu"), _quant.for_moment("q8", "nu")),
    "q4_dynamic_128": (Q(4, 128, "dynamic", signed=True), Q(4, 128, "dynamic", signed=False)),
    "linear8_4096": (Q(8, 4096, "linear", signed=True), Q(8, 4096, "linear", signed=False)),
    "linear4_16": (Q(4, 16, "linear", signed=True), Q(4, 16, "linear", signed=False)),
}
CASES = [("q8", "adam", False), ("q4_dynamic_128", "amsgrad", True),
         ("linear8_4096", "nadam", True), ("linear4_16", "adam", False)]
RULES = {"adam": _rule.Rule(kernel="fused"), "nadam": _rule.Rule(nesterov=True, kernel="fused"),
         "amsgrad": _rule.Rule(kind="amsgrad", kernel="fused")}


def custom_calls(fn, *args) -> int:
  return len(re.findall(r"custom-call\(", jax.jit(fn).lower(*args).compile().as_text()))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf step
@pytest.mark.parametrize("fmt,name,apply", CASES)
def test_bit_identical_to_a_numpy_float32_reference(fmt, name, apply):
  """Codes, scales, updates and params bit for bit those of NumPy's float32
  decode, step and encode, for 6 teacher-forced steps: leaves over several
  work items with a partial last block, one element, one leaf with float32
  moments beside quantized ones, and an inf gradient at step 3 (an inf
  absmax and NaN values in its block, propagated like the XLA path)."""
  rule = RULES[name]
  hp = _rule.Hyper(learning_rate=3e-3, b1=0.9, b2=0.99, eps=1e-8, eps_root=1e-12,
                   weight_decay=0.05)
  rng = np.random.default_rng(11)
  sizes, quantized = (70001, 513, 1, 3000), (True, True, True, False)
  decay = (True, False, True, True)
  formats = FORMATS[fmt] + (FORMATS[fmt][1],)  # nu_max like nu
  params = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]

  def initial(k, n, q):
    x = np.abs(rng.normal(size=n)).astype(np.float32) * 1e-3
    if k == 0:
      x = x * np.sign(rng.normal(size=n)).astype(np.float32)
    if not q:
      return jnp.asarray(x)
    codes, scales = _np_quant.encode(x, formats[k])  # (no XLA compile per leaf)
    return _quant.QArray(jnp.asarray(codes.reshape(scales.size, -1)), (jnp.asarray(scales),),
                         formats[k], (n,))

  moments = [[initial(k, n, q) for n, q in zip(sizes, quantized)]
             for k in range(len(rule.moment_names))]
  out_dtypes = [jnp.float32] * len(sizes)

  kernel_step = whole_leaf_kernel_step(rule, hp, decay, apply, out_dtypes)

  def as_np(m, n):
    if isinstance(m, _quant.QArray):
      return _np_quant.decode(np.asarray(m.codes), np.asarray(m.scales[0]), m.fmt, n)
    return np.asarray(m)

  count = jnp.asarray(0, jnp.int32)
  for step in range(6):
    grads = [rng.normal(size=n).astype(np.float32) * 1e-2 for n in sizes]
    if step == 3:
      grads[1][7] = np.inf
    grads = [jnp.asarray(g) for g in grads]
    vector, count, results = kernel_step(count, grads, moments, params)
    scalars = dict(zip(_ffi.SCALARS, np.asarray(vector)))
    for i, (out, new_moments) in enumerate(results):
      old = [as_np(m[i], sizes[i]) for m in moments]
      ref_out, ref_moments = _np_adam.step(rule.kind, rule.nesterov, scalars, grads[i], old,
                                           params[i], decay[i], apply)
      np.testing.assert_array_equal(np.asarray(out), ref_out, err_msg=f"step {step} leaf {i}")
      for k, (got, ref) in enumerate(zip(new_moments, ref_moments)):
        if isinstance(got, _quant.QArray):
          assert got.fmt == formats[k] and got.shape == (sizes[i],)
          codes, scales = _np_quant.encode(ref, got.fmt)
          np.testing.assert_array_equal(np.asarray(got.scales[0]), scales,
                                        err_msg=f"step {step} leaf {i} moment {k} scales")
          np.testing.assert_array_equal(np.asarray(got.codes).reshape(-1), codes,
                                        err_msg=f"step {step} leaf {i} moment {k} codes")
        else:
          np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"leaf {i} moment {k}")
    moments = [[r[1][k] for r in results] for k in range(len(rule.moment_names))]
    if apply:
      params = [r[0] for r in results]
  assert int(count) == 6


RANK1 = Q(4, 128, "linear", rank1=True, signed=False)  # q4's nu on a tensor


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf step
@pytest.mark.parametrize("name,apply", [("adam", False), ("amsgrad", True)])
def test_rank1_bit_identical_to_a_numpy_float32_reference(name, apply):
  """q4 as the optimizers store it on tensors: ``mu`` block-wise, ``nu`` (and
  AMSGrad's ``nu_max``) rank-1 (codes over the whole tensor times the minimum
  of its dimensions' maxima). Codes, maxima, updates and params bit for bit
  NumPy's for 5 teacher-forced steps: 2-D and 3-D tensors over several work
  items, an odd element count (a padded last nibble), one float32-moment
  leaf beside them, and an inf gradient at step 3 (NaN maxima propagated)."""
  rule = RULES[name]
  hp = _rule.Hyper(learning_rate=3e-3, b1=0.9, b2=0.99, eps=1e-8, eps_root=1e-12,
                   weight_decay=0.05)
  rng = np.random.default_rng(12)
  shapes = ((300, 101), (7, 9, 13), (64, 80), (3000,))
  decay = (True, False, True, True)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  mu_fmt = FORMATS["q4_dynamic_128"][0]

  def initial(k, shape):
    x = np.abs(rng.normal(size=shape)).astype(np.float32) * 1e-3
    if len(shape) == 1:
      return jnp.asarray(x)
    if k == 0:
      x = x * np.sign(rng.normal(size=shape)).astype(np.float32)
      codes, scales = _np_quant.encode(x, mu_fmt)
      return _quant.QArray(jnp.asarray(codes.reshape(scales.size, -1)), (jnp.asarray(scales),),
                           mu_fmt, shape)
    codes, stats = _np_quant.encode_rank1(x, RANK1, shape)
    return _quant.QArray(jnp.asarray(codes), tuple(map(jnp.asarray, stats)), RANK1, shape, shape)

  def as_np(m, shape):
    if not isinstance(m, _quant.QArray):
      return np.asarray(m).reshape(-1)
    if m.rank1:
      return _np_quant.decode_rank1(np.asarray(m.codes), [np.asarray(s) for s in m.scales],
                                    m.fmt, shape)
    return _np_quant.decode(np.asarray(m.codes), np.asarray(m.scales[0]), m.fmt,
                            int(np.prod(shape)))

  moments = [[initial(k, s) for s in shapes] for k in range(len(rule.moment_names))]
  kernel_step = whole_leaf_kernel_step(rule, hp, decay, apply, [jnp.float32] * len(shapes))
  count = jnp.asarray(0, jnp.int32)
  for step in range(5):
    grads = [rng.normal(size=s).astype(np.float32) * 1e-2 for s in shapes]
    if step == 3:
      grads[1][2, 3, 4] = np.inf
    grads = [jnp.asarray(g) for g in grads]
    vector, count, results = kernel_step(count, grads, moments, params)
    scalars = dict(zip(_ffi.SCALARS, np.asarray(vector)))
    for i, (out, new_moments) in enumerate(results):
      old = [as_np(m[i], shapes[i]) for m in moments]
      ref_out, ref_moments = _np_adam.step(rule.kind, rule.nesterov, scalars,
                                           np.asarray(grads[i]).reshape(-1), old,
                                           np.asarray(params[i]).reshape(-1), decay[i], apply)
      where = f"step {step} leaf {i}"
      np.testing.assert_array_equal(np.asarray(out).reshape(-1), ref_out, err_msg=where)
      for k, (got, ref) in enumerate(zip(new_moments, ref_moments)):
        if isinstance(got, _quant.QArray) and got.rank1:
          codes, stats = _np_quant.encode_rank1(ref, got.fmt, shapes[i])
          for d, (a, b) in enumerate(zip(got.scales, stats)):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"{where} moment {k} dim {d}")
          np.testing.assert_array_equal(np.asarray(got.codes), codes, err_msg=f"{where} moment {k}")
        elif isinstance(got, _quant.QArray):
          codes, scales = _np_quant.encode(ref, got.fmt)
          np.testing.assert_array_equal(np.asarray(got.scales[0]), scales, err_msg=where)
          np.testing.assert_array_equal(np.asarray(got.codes).reshape(-1), codes, err_msg=where)
        else:
          np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"{where} moment {k}")
    moments = [[r[1][k] for r in results] for k in range(len(rule.moment_names))]
    if apply:
      params = [r[0] for r in results]
  assert int(count) == 5


# ------------------------------------------- through the optimizers and layouts

CLOSE = dict(rtol=2e-6, atol=5e-8)  # float32 rounding (as tests/test_kernel.py)


def q8_tree():
  rng = np.random.default_rng(5)
  return {"w": jnp.asarray(rng.normal(size=(96, 80)), jnp.float32),  # quantized
          "b": jnp.asarray(rng.normal(size=(5000,)), jnp.float32),   # quantized, partial block
          "s": jnp.asarray(rng.normal(size=(10,)), jnp.float32)}     # float32 moments


def is_quantized(x) -> bool:
  return isinstance(x, _quant.QArray)


def quantized_moments(tree) -> list:
  return [x for x in jax.tree.leaves(tree, is_leaf=is_quantized) if is_quantized(x)]


def assert_states_agree(got, want):
  """Two states from the same start and gradient: float leaves to float32
  rounding; a quantized moment's scales likewise, its codes within one code
  (a value on the boundary between two codes can round either way)."""
  qs = is_quantized
  got_leaves, want_leaves = (jax.tree.leaves(s, is_leaf=qs) for s in (got, want))
  assert len(got_leaves) == len(want_leaves)
  n_quantized = 0
  for a, b in zip(got_leaves, want_leaves):
    if qs(b):
      n_quantized += 1
      assert qs(a) and a.fmt == b.fmt
      for sa, sb in zip(a.scales, b.scales, strict=True):  # rank-1: one per dimension
        np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), **CLOSE)
      diff = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32))
      assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), **CLOSE)
  return n_quantized


@pytest.mark.parametrize("fmt,layout", [("q8", "tree"), ("q8", "flat"), ("q4", "tree"),
                                        ("q4", "flat")])
def test_q8_updates_agree_with_the_xla_path(fmt, layout):
  """``jadam.adam(mu_dtype="q8", nu_dtype="q8")`` with the kernel forced, in
  the tree layout and the flat one (packed buffers), and q4 (``nu`` rank-1
  on the matrix, at the start of its buffer when flat): one kernel call per step, and from the
  same state and gradient (teacher-forced, 5 steps) the XLA path's updates to
  float32 rounding and its codes to within one."""
  params = q8_tree()
  txs = {k: jadam.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt, layout=layout, kernel=k)
         for k in ("fused", "xla")}
  state = txs["xla"].init(params)
  assert custom_calls(txs["fused"].update, params, state, params) == 1
  assert custom_calls(txs["xla"].update, params, state, params) == 0
  updates = {k: jax.jit(tx.update) for k, tx in txs.items()}
  rng = np.random.default_rng(6)
  for _ in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-2, jnp.float32), params)
    (uf, sf), (ux, sx) = (updates[k](g, state, params) for k in ("fused", "xla"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **CLOSE),
                 uf, ux)
    assert assert_states_agree(sf, sx) >= 2
    state, params = sx, jax.tree.map(jnp.add, params, ux)


@pytest.mark.parametrize("packed", [False, True])
def test_q8_skipped_step_leaves_codes_and_scales_as_they_were(packed):
  """``skip_nonfinite`` with q8 moments in the kernel (``jadam.step``, tree
  or packed params): a NaN, then an inf, in one gradient element returns the
  params, codes, scales and count bit for bit as they were; the steps around
  them are taken."""
  params = q8_tree()
  if packed:  # in the buffers of the q8 flat layout (as the bench's jadam_flat_q8 row)
    flat = jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q8", layout="flat")
    layout = jax.eval_shape(flat.init, params)[0].mu.layout
    params = layout.pack(params)
  state = jadam.init(params, mu_dtype="q8", nu_dtype="q8")
  assert quantized_moments(state)
  step = jax.jit(lambda g, s, p: jadam.step(g, s, p, learning_rate=1e-2, skip_nonfinite=True,
                                            kernel="fused"))
  assert custom_calls(lambda g, s, p: jadam.step(g, s, p, learning_rate=1e-2,
                                                 skip_nonfinite=True, kernel="fused"),
                      params, state, params) == 1
  g = jax.tree.map(lambda x: jnp.full(x.shape, 1e-2, x.dtype), params)
  params, state = step(g, state, params)
  for bad in (jnp.nan, jnp.inf):
    leaves, treedef = jax.tree.flatten(g)
    leaves[0] = leaves[0].reshape(-1).at[17].set(bad).reshape(leaves[0].shape)
    before = jax.tree.map(np.asarray, (params, state))
    params, state = step(jax.tree.unflatten(treedef, leaves), state, params)
    after = jax.tree.map(np.asarray, (params, state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
  params, state = step(g, state, params)
  assert int(optax.tree_utils.tree_get(state, "count")) == 2  # the two bad steps not counted


def test_auto_runs_rank1_moments_in_the_kernel_in_both_layouts(monkeypatch):
  """q4's ``nu`` is rank-1 on a 2-D leaf, in the tree layout and at the start
  of its own packed buffer in the flat layout (the rest decodes to 0): "auto"
  runs both in the kernel, one call each."""
  monkeypatch.setenv("JADAM_KERNEL", "fused")  # "auto": the kernel wherever it can run
  matrix = {"w": jnp.ones((64, 80))}
  vector = {"w": jnp.ones((5120,))}
  for layout in ("tree", "flat"):
    q4 = jadam.adam(1e-3, mu_dtype="q4", nu_dtype="q4", layout=layout)
    assert any(m.rank1 for m in quantized_moments(q4.init(matrix)))
    assert custom_calls(q4.update, matrix, q4.init(matrix), matrix) == 1
    assert custom_calls(q4.update, vector, q4.init(vector), vector) == 1


def test_zero2_slices_with_q8_moments_run_the_kernel():
  """zero2 on 8 devices with 8-bit moments (blocks of 16, every leaf
  quantized): each device's slice of codes and scales goes through the
  kernel; a NaN batch is skipped on every device; from the same state and
  batch (teacher-forced) the XLA path's params to float32 rounding and
  codes to within one."""
  from jadam import parallel  # pylint: disable=import-outside-toplevel
  params, x, y, mesh = regression_problem()
  fmt = jadam.Quantized(bits=8, block_size=16, min_quantized_size=0)
  trainers = {}
  for kernel in ("fused", "xla"):
    tx = jadam.adamw(1e-2, weight_decay=0.1, mu_dtype=fmt, nu_dtype=fmt, skip_nonfinite=True,
                     kernel=kernel)
    trainers[kernel] = parallel.DataParallel(regression_loss, tx, mesh, strategy="zero2")
  p, s = trainers["xla"].init(params)
  assert quantized_moments(s)  # quantized moments in the slices
  for kernel, want in (("fused", 1), ("xla", 0)):
    hlo = trainers[kernel].lower(p, s, (x, y)).compile().as_text()
    assert len(re.findall(r"custom-call\(", hlo)) == want
  for t in range(4):
    batch = (x.at[3, 3].set(jnp.nan) if t == 2 else x, y)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # pylint: disable=unnecessary-lambda-assignment
    before = jax.tree.map(np.asarray, s)
    pf, sf, _ = trainers["fused"].step(copy(p), copy(s), batch)
    px, sx, _ = trainers["xla"].step(p, s, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **CLOSE),
                 pf, px)
    assert_states_agree(sf, sx)
    if t == 2:  # skipped on every device: codes, scales and count as they were
      moved = [(a, b) for a, b in zip(jax.tree.leaves(sf), jax.tree.leaves(before))
               if a.dtype in (np.uint8, np.float32)]
      assert len(moved) >= 4
      for a, b in moved:
        np.testing.assert_array_equal(np.asarray(a), b)
      assert (int(optax.tree_utils.tree_get(sf, "count"))
              == int(optax.tree_utils.tree_get(before, "count")) == 2)
    p, s = px, sx
  assert int(optax.tree_utils.tree_get(s, "count")) == 3


def test_auto_runs_the_kernel_for_quantized_drop_in_updates(monkeypatch):
  """Unset $JADAM_KERNEL: the optax drop-in's update runs the kernel when a
  moment is quantized (XLA's decode and encode are the slower path there),
  XLA's ops when none is (a leaf under min_quantized_size keeps float32
  moments), and never with JADAM_KERNEL=xla."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)
  big, small = {"w": jnp.ones((64, 80))}, {"w": jnp.ones((64,))}
  q8 = jadam.adam(1e-3, mu_dtype="q8", nu_dtype="q8")
  assert custom_calls(q8.update, big, q8.init(big), big) == 1
  assert custom_calls(q8.update, small, q8.init(small), small) == 0
  monkeypatch.setenv("JADAM_KERNEL", "xla")  # read when a step is traced: a new function
  assert custom_calls(lambda *a: q8.update(*a), big, q8.init(big), big) == 0


def test_drop_in_update_overwrites_a_temporary_gradient():
  """The drop-in's update (float32 gradient, float32 update) is written over
  the gradient, block by block after reading it: in a train step whose
  gradient is computed in the same jit, the custom call's update output is
  aliased to its gradient operand, and no copy of the gradient is made (a
  fresh 64 MB buffer per step costs a page fault per 8 KB: BENCHMARKS.md);
  the step equals the XLA path's to float32 rounding."""
  params = q8_tree()
  x = jnp.asarray(np.random.default_rng(8).normal(size=(96,)), jnp.float32)

  def train_step(tx):
    def step(p, s):
      g = jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"])) + jnp.sum(p["b"] ** 2)
                   + jnp.sum(p["s"] ** 2))(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1))

  txs = {k: jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q8", kernel=k) for k in ("fused", "xla")}
  state = txs["xla"].init(params)
  hlo = train_step(txs["fused"]).lower(params, state).compile().as_text()
  call = next(l for l in hlo.splitlines() if "custom-call(" in l and "jadam_adam_step" in l)
  operands = re.search(r"custom-call\(([^)]*)\)", call).group(1).split(", ")
  aliased = dict((int(o), int(i)) for o, i in re.findall(r"\{(\d+)\}: \((\d+), \{\}\)", call))
  assert aliased[0] == 1 and operands[1].startswith("%multiply")  # the update: the gradient
  assert " copy(" not in hlo[hlo.index("ENTRY"):]  # (params and state donated)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # pylint: disable=unnecessary-lambda-assignment
  (pf, sf), (px, sx) = (train_step(tx)(copy(params), copy(state))
                        for tx in (txs["fused"], txs["xla"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **CLOSE),
               pf, px)
  assert_states_agree(sf, sx)
