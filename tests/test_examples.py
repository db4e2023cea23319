"""The example programs run end to end (briefly) and print what they promise.

Each runs as a subprocess with a small ``--steps``, a timeout, and fake CPU
devices; the assertions read its stdout.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import jadam.parallel  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 300


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(EXAMPLES / name), *args], env=env,
      capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, (
      f"{name} {' '.join(args)} exited with {proc.returncode}\n"
      f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
  return proc


def read_float(pattern: str, text: str) -> float:
  match = re.search(pattern, text, re.M)
  assert match, f"no line matching {pattern!r} in:\n{text}"
  return float(match.group(1))


DIGITS_ARGS = ("--steps", "60", "--fake-devices", "2")


@pytest.fixture(scope="module")
def digits_jadam():
  return run_example("train_digits.py", *DIGITS_ARGS)


def test_train_digits(digits_jadam):
  out = digits_jadam.stdout
  assert "on 2 cpu device(s)" in out
  assert read_float(r"^test accuracy: (\d\.\d+)", out) >= 0.9
  assert read_float(r"^wall time: ([\d.]+) s$", out) > 0
  assert "train:" in digits_jadam.stderr  # the tqdm progress bar


def test_train_digits_optax_prints_the_same(digits_jadam):
  """optax.adamw in the same data-parallel loop: float32 jadam is optax to
  the bit, so the final loss and accuracy lines are the same."""
  proc = run_example("train_digits.py", *DIGITS_ARGS, "--optimizer", "optax")
  assert "optax.adamw" in proc.stdout
  for line in ("final train loss", "test accuracy"):
    ours = [s for s in digits_jadam.stdout.splitlines() if s.startswith(line)]
    theirs = [s for s in proc.stdout.splitlines() if s.startswith(line)]
    assert ours and ours == theirs, (ours, theirs)


@pytest.mark.skipif("zero1" not in jadam.parallel.available_strategies(),
                    reason="the zero1 strategy is not built yet")
def test_train_lm_zero1_bfloat16_moments():
  proc = run_example(
      "train_lm.py", "--steps", "6", "--log-every", "3", "--fake-devices",
      "4", "--strategy", "zero1", "--mu-dtype", "bfloat16", "--nu-dtype",
      "bfloat16", "--batch-size", "8", "--seq-len", "32", "--d-model", "32",
      "--layers", "1", "--heads", "2", "--sample-chars", "20")
  out = proc.stdout
  assert "mu bfloat16, nu bfloat16" in out and "strategy zero1 on 4" in out
  uniform = read_float(r"uniform loss ([\d.]+)", out)
  for step in (3, 6):  # the loss curve: one line per --log-every steps
    train = read_float(rf"^step +{step}  train loss ([\d.]+)", out)
    val = read_float(rf"^step +{step}  train loss [\d.]+  val loss ([\d.]+)",
                     out)
    assert math.isfinite(train) and math.isfinite(val)
    assert train < uniform + 0.5
  sample = out.split("--- sample")[1].split("\n", 1)[1]
  sample = sample.rsplit("\n---\nwall time", 1)[0]
  assert sample.startswith("MENENIUS:\n")
  assert len(sample) == len("MENENIUS:\n") + 20
  assert read_float(r"^wall time: ([\d.]+) s$", out) > 0
