"""``python -m jadam.bench --quick``: runs, and writes a sane table, JSON and plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from jadam.bench import _bench

KEYS = {"case", "impl", "median_ms", "speedup_vs_optax", "compile_s", "gb_per_s",
        "bandwidth_fraction", "peak_bytes"}
JAX_IMPLS = ["optax", "jadam_tree", "jadam_flat_tree_io", "jadam_flat"]


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
  torch = _bench.torch_available()
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


def test_quick_table_and_plot(quick_run):
  stdout, records, png = quick_run
  assert "jadam.bench" in stdout and "measured copy bandwidth" in stdout
  for impl in JAX_IMPLS:
    assert impl in stdout
  assert stdout.count("| (c) many small leaves") == sum(r["case"] == "c" for r in records)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_cases():
  with pytest.raises(SystemExit):
    _bench.main(["--cases", "a,z"])
  with pytest.raises(ValueError, match="unknown"):
    _bench.run(cases=["z"])
