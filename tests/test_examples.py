"""The example programs run end to end (briefly) and print what they promise.

Each runs as a subprocess with a small ``--steps``, a timeout, and fake CPU
devices; the assertions read its stdout and compare its numbers with a
reference run of the same program: optax's optimizer, or one device.
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


def printed_units(numbers: dict[str, str]) -> dict[str, int]:
  """Printed decimals as integers in units of their last digit."""
  return {k: int(v.replace(".", "")) for k, v in numbers.items()}


def assert_same_to_last_digit(ours: dict[str, str], theirs: dict[str, str]):
  """Two runs that agree to float32 rounding print the same numbers, give or
  take one unit in the last printed digit (a rounding boundary between
  them)."""
  assert ours.keys() == theirs.keys(), (ours, theirs)
  decimals = lambda v: len(v.partition(".")[2])
  assert all(decimals(ours[k]) == decimals(theirs[k]) for k in ours)
  a, b = printed_units(ours), printed_units(theirs)
  assert all(abs(a[k] - b[k]) <= 1 for k in a), (ours, theirs)


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


# A few steps of a tiny transformer, bfloat16 moments.
LM_ARGS = ("--steps", "6", "--log-every", "3", "--mu-dtype", "bfloat16",
           "--nu-dtype", "bfloat16", "--batch-size", "8", "--seq-len", "32",
           "--d-model", "32", "--layers", "1", "--heads", "2",
           "--sample-chars", "20")


def loss_curve(out: str) -> dict[str, str]:
  """The printed losses: ``{"3 train": "4.544", "3 val": "4.166", ...}``."""
  curve = {}
  for m in re.finditer(
      r"^step +(\d+)  train loss ([\d.]+)  val loss ([\d.]+)$", out, re.M):
    curve[f"{m[1]} train"], curve[f"{m[1]} val"] = m[2], m[3]
  return curve


@pytest.mark.skipif("zero1" not in jadam.parallel.available_strategies(),
                    reason="the zero1 strategy is not built yet")
def test_train_lm_zero1_bfloat16_moments():
  proc = run_example("train_lm.py", *LM_ARGS, "--fake-devices", "4",
                     "--strategy", "zero1")
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

  # ZeRO over 4 devices gives a single-device run's results: the same
  # program on one device (same seed, same batches, same moment dtypes)
  # prints the same loss curve.
  reference = run_example("train_lm.py", *LM_ARGS, "--fake-devices", "1",
                          "--strategy", "shard_map")
  assert "strategy shard_map on 1" in reference.stdout
  ours, theirs = loss_curve(out), loss_curve(reference.stdout)
  assert len(ours) == 4, out
  assert_same_to_last_digit(ours, theirs)


def final_line(out: str) -> dict[str, str]:
  """data_parallel.py's summary: ``first loss 1.4835, final loss ...``."""
  match = re.search(r"^first loss ([\d.]+), final loss ([\d.]+), "
                    r"accuracy ([\d.]+), \|w1\| ([\d.]+)$", out, re.M)
  assert match, out
  return dict(zip(("first loss", "final loss", "accuracy", "|w1|"),
                  match.groups()))


def test_data_parallel_aux_matches_one_device():
  """8 devices x 2 micro-batches against one device on the same global
  batches: the losses, the params' norm, and the accuracy, which is the
  ``has_aux`` output averaged over devices and micro-batches (a sum over
  them would print more than 1; one device's share, a multiple of 1/32)."""
  args = ("--steps", "30", "--strategy", "shard_map")
  proc = run_example("data_parallel.py", *args, "--fake-devices", "8",
                     "--accumulation-steps", "2")
  reference = run_example("data_parallel.py", *args, "--fake-devices", "1")
  assert "1 processes, 8 devices" in proc.stdout
  assert "1 processes, 1 devices" in reference.stdout
  ours, theirs = final_line(proc.stdout), final_line(reference.stdout)
  assert float(ours["final loss"]) < float(ours["first loss"])  # it trained
  assert_same_to_last_digit(ours, theirs)
