"""``python -m jadam.bench --quick``: runs, and writes a sane table, JSON and plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import jadam
from jadam.bench import _bench
from jadam.bench import _runners

KEYS = {"case", "impl", "median_ms", "speedup_vs_optax", "compile_s", "gb_per_s",
        "bandwidth_fraction", "peak_bytes", "max_abs_diff_vs_optax",
        "max_rel_diff_vs_optax", "diff_steps"}
JAX_IMPLS = ["optax", "jadam_tree", "jadam_flat_tree_io", "jadam_flat"]
FLAT_IMPLS = ["jadam_flat_tree_io", "jadam_flat"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one plain CPU device
  proc = subprocess.run(
      [sys.executable, "-m", "jadam.bench", "--quick", "--json", str(out / "bench.json"),
       "--plot", str(out / "bench.png")],
      capture_output=True, text=True, env=env, timeout=600, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_quick_json_records(quick_run):
  _, records, _ = quick_run
  torch = _runners.torch_available()
  for case in _bench.CASES:
    got = [r["impl"] for r in records if r["case"] == case]
    want = JAX_IMPLS + ([] if case == "e" else
                        (["torch_fused", "torch_foreach"] if torch else []) + ["optax_sgd"])
    assert got == want, case
  for r in records:
    assert KEYS <= set(r), r
    assert r["median_ms"] > 0 and r["steps"] >= 6
    assert r["n_params"] > 0 and r["n_leaves"] >= 1
    if r["impl"] == "optax":
      assert r["speedup_vs_optax"] == 1.0
    assert r["speedup_vs_optax"] > 0
    assert math.isclose(
        r["speedup_vs_optax"],
        next(o["median_ms"] for o in records if o["case"] == r["case"] and o["impl"] == "optax")
        / r["median_ms"], rel_tol=1e-9)
    if r["impl"].startswith("torch"):
      assert r["compile_s"] is None
    else:
      assert r["compile_s"] > 0 and r["peak_bytes"] > 0
    if r["case"] == "e":  # a full training step: no optimizer bandwidth model
      assert r["gb_per_s"] is None and r["bandwidth_fraction"] is None
    else:
      assert r["gb_per_s"] > 0 and r["bytes_per_param"] == (12 if r["impl"] == "optax_sgd" else 28)
      assert math.isclose(r["gb_per_s"], r["bytes_per_param"] * r["n_params"] / r["median_ms"] / 1e6,
                          rel_tol=1e-9)
      assert math.isclose(r["bandwidth_fraction"], r["gb_per_s"] / r["copy_gb_per_s"],
                          rel_tol=1e-9)
  c = [r for r in records if r["case"] == "c"]
  assert {r["n_leaves"] for r in c} == {64}


def _diff(r):
  return r["max_abs_diff_vs_optax"], r["max_rel_diff_vs_optax"]


def test_quick_diff_vs_optax(quick_run):
  """Every Adam row says how far its params are from optax's after the same
  steps from the same start; jadam's tree layout is optax bit for bit."""
  _, records, _ = quick_run
  for case in _bench.CASES:
    rows = [r for r in records if r["case"] == case]
    adam = [r for r in rows if r["impl"] != "optax_sgd"]
    # The same number of steps for every implementation: the warm-up, then
    # per round one untimed step and the timed ones.
    assert len({r["diff_steps"] for r in adam}) == 1, [(r["impl"], r["diff_steps"]) for r in adam]
    for r in adam:
      assert r["diff_steps"] >= r["steps"] + 2, r
      a, rel = _diff(r)
      assert math.isfinite(a) and math.isfinite(rel) and a >= 0 and rel >= 0, r
    for r in rows:
      if r["impl"] == "optax_sgd":  # not Adam: nothing to compare
        assert _diff(r) == (None, None) and r["diff_steps"] is None
      elif r["impl"] in ("optax", "jadam_tree"):
        assert _diff(r) == (0.0, 0.0), r
      elif r["impl"].startswith("torch"):
        # torch computes the bias corrections in float64, optax ``1 - b2**t``
        # in float32, which loses up to ~1e-4 of it for t <= 10 (0.999**t is
        # rounded near 1): each update (|u| <= lr for a constant gradient)
        # moves by at most ~1e-4 of lr.
        assert r["max_abs_diff_vs_optax"] <= r["diff_steps"] * _runners.LEARNING_RATE * 1e-4, r
  # One leaf: every jadam form compiles to optax's kernel, bit for bit.
  for r in records:
    if r["case"] == "a" and r["impl"] in JAX_IMPLS:
      assert _diff(r) == (0.0, 0.0), r


@pytest.mark.xfail(strict=True, reason=(
    "the flat forms are optax's float32 arithmetic on packed buffers, and XLA:CPU rounds "
    "the same expressions differently in a one-buffer program than in a per-leaf one "
    "(which product of `0.1 g + 0.9 mu` it contracts into an FMA; `x / bc` as "
    "`x * (1 / bc)` or `(m / bc1) / d` as `m / (bc1 d)`): optax itself on the same "
    "numbers in one concatenated leaf differs from optax on the tree by ulps. In (e) "
    "the attention key bias, whose true gradient is 0, turns those ulps into lr-sized "
    "moves. test_flat_step_is_optax_on_the_same_buffers holds the flat step to optax."))
def test_quick_flat_rows_bit_identical_to_optax(quick_run):
  _, records, _ = quick_run
  off = [(r["case"], r["impl"], _diff(r)) for r in records
         if r["impl"] in FLAT_IMPLS and _diff(r) != (0.0, 0.0)]
  assert not off, off


@pytest.mark.parametrize("case", ["a", "b", "c", "d"])
def test_flat_step_is_optax_on_the_same_buffers(case):
  """The bench's ``jadam_flat`` step (``jadam.step`` on packed params,
  gradients and state) against ``optax.adam`` + ``apply_updates`` on the same
  packed buffers, as a pytree: bit for bit, params and moments, over the
  bench's quick number of steps."""
  shapes = _runners.make_cases(True, "cpu")[case].shapes
  device = jax.devices()[0]
  params = _runners._random_tree(shapes, 0, 0.02, device)  # pylint: disable=protected-access
  grads = _runners._random_tree(shapes, 1, 1e-3, device)  # pylint: disable=protected-access
  layout = jadam.FlatLayout.from_tree(params)
  packed, packed_grads = layout.pack(params), layout.pack(grads)

  flat = jax.jit(_runners._flat_step())  # pylint: disable=protected-access
  p, state = packed, jadam.init(packed)
  tx = optax.adam(_runners.LEARNING_RATE)
  ref_step = jax.jit(_runners._optimizer_step(tx))  # pylint: disable=protected-access
  ref, ref_state = packed, tx.init(packed)
  for _ in range(10):
    p, state = flat(p, state, packed_grads)
    ref, ref_state = ref_step(ref, ref_state, packed_grads)
  (ref_adam, _) = ref_state
  for got, want in ((p, ref), (state.mu, ref_adam.mu), (state.nu, ref_adam.nu)):
    assert set(got) == set(want) == set(layout.keys)
    for k in layout.keys:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  assert int(state.count) == int(ref_adam.count) == 10


def test_params_diff_measures_the_difference():
  ref = [np.array([1.0, -2.0, 0.0], np.float32), np.array([[4.0]], np.float32)]
  got = [np.array([1.0, -2.5, 0.0], np.float32), np.array([[4.0 + 2**-20]], np.float32)]
  assert _bench.params_diff(ref, ref) == (0.0, 0.0)
  # 0.5 at -2.0 (relative 0.25); 2**-20 at 4 (relative 2**-22).
  assert _bench.params_diff(got, ref) == (0.5, 0.25)
  # A moved zero counts in the absolute difference only.
  moved = [np.array([1.0, -2.0, 1e-3], np.float32), got[1]]
  assert _bench.params_diff(moved, ref) == (float(np.float32(1e-3)), 2**-22)
  with pytest.raises(ValueError, match="shape"):
    _bench.params_diff([ref[1]], [ref[0]])


def test_quick_table_and_plot(quick_run):
  stdout, records, png = quick_run
  assert "jadam.bench" in stdout and "measured copy bandwidth" in stdout
  assert "diff vs optax abs/rel" in stdout
  for impl in JAX_IMPLS:
    assert impl in stdout
  assert stdout.count("| (c) many small leaves") == sum(r["case"] == "c" for r in records)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_cases():
  with pytest.raises(SystemExit):
    _bench.main(["--cases", "a,z"])
  with pytest.raises(ValueError, match="unknown"):
    _bench.run(cases=["z"])
