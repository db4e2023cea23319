"""The example programs run end to end (briefly) and print what they promise.

Each runs as a subprocess with a small ``--steps``, a timeout, and fake CPU
devices; the assertions read its stdout and compare its numbers with a
reference run of the same program: optax's optimizer, or one device.
"""

from __future__ import annotations

import importlib.util
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
  return run_examples(name, args)[0]


def run_examples(name: str, *arg_lists) -> list[subprocess.CompletedProcess]:
  """Runs ``name`` once per argument list, all at once (each run is mostly
  one process's start-up and compilation), and checks that each succeeded."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  running = [
      (args, subprocess.Popen(
          [sys.executable, str(EXAMPLES / name), *args], env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
      for args in arg_lists]
  procs = []
  for args, popen in running:
    try:
      stdout, stderr = popen.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for _, other in running:
        other.kill()
      raise
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout,
                                       stderr)
    assert proc.returncode == 0, (
        f"{name} {' '.join(args)} exited with {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    procs.append(proc)
  return procs


def load_example(name: str):
  """An example as a module (its top level imports only the standard
  library: JAX starts in ``main``)."""
  spec = importlib.util.spec_from_file_location(name.removesuffix(".py"),
                                                EXAMPLES / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


# The default 300 steps: steps are cheap next to start-up and compilation.
DIGITS_ARGS = ("--steps", "300", "--fake-devices", "2")


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


def quantized_moments(out: str) -> int:
  """How many moments of the example's optimizer state are jadam.QArrays."""
  return int(read_float(r"^optimizer state: .*?(\d+) quantized moments$", out))


@pytest.fixture(scope="module")
def digits_variants():
  """q8 moments, and float16 params with a dynamic loss scale (run at once)."""
  q8, fp16 = run_examples("train_digits.py", (*DIGITS_ARGS, "--mu-dtype", "q8", "--nu-dtype", "q8"),
                          (*DIGITS_ARGS, "--param-dtype", "float16", "--loss-scale", "dynamic"))
  return {"q8": q8, "float16": fp16}


def test_train_digits_float16_dynamic_loss_scale(digits_variants):
  out = digits_variants["float16"].stdout
  assert "float16 params; jadam.adamw (mu float32, nu float32" not in out  # no moment flags
  assert out.startswith("digits:") and "float16 params; jadam.adamw" in out
  assert read_float(r"^test accuracy: (\d\.\d+)", out) >= 0.95
  assert re.search(r"^loss scale: \d+ at the end, \d+ steps skipped$", out, re.M), out


def test_train_digits_q8_moments(digits_jadam, digits_variants):
  """8-bit moments (mu and nu) reach the float32 run's test accuracy: at
  least 0.97, and within one point of float32 moments (same seed, same
  batches)."""
  out = digits_variants["q8"].stdout
  assert "jadam.adamw (mu q8, nu q8, layout=tree)" in out
  # Really quantized: mu and nu of the two hidden kernels (64 x 256 and
  # 256 x 256); the output kernel (256 x 10 = 2,560 elements), biases and
  # LayerNorm scales are under 4,096 elements and keep float32 moments.
  assert quantized_moments(out) == 4
  assert "quantized moments" not in digits_jadam.stdout  # default moments
  float32 = read_float(r"^test accuracy: (\d\.\d+)", digits_jadam.stdout)
  q8 = read_float(r"^test accuracy: (\d\.\d+)", out)
  assert float32 >= 0.97, digits_jadam.stdout
  assert q8 >= 0.97 and q8 >= float32 - 0.01, (q8, float32)


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "optax", "--mu-dtype", "q8"],
     "--mu-dtype q8: quantized moments are jadam's; optax.adamw has none"),
    (["--optimizer", "optax", "--mu-dtype", "float32", "--nu-dtype", "q4"],
     "--nu-dtype: optax.adamw keeps nu in the params' dtype"),
    (["--mu-dtype", "q2"], "argument --mu-dtype: invalid choice: 'q2'")])
def test_train_digits_refuses_moments_it_cannot_keep(argv, message, capsys):
  """optax.adamw has no quantized moments (and no nu_dtype): an argparse
  error, before JAX starts."""
  train_digits = load_example("train_digits.py")
  with pytest.raises(SystemExit) as exit_info:
    train_digits.parse_args(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"error: {message}" in err, err
  args = train_digits.parse_args(["--mu-dtype", "q8", "--nu-dtype", "q4"])
  assert (args.mu_dtype, args.nu_dtype) == ("q8", "q4")


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
  # The reference (one device) runs at the same time.
  proc, reference = run_examples(
      "train_lm.py", (*LM_ARGS, "--fake-devices", "4", "--strategy", "zero1"),
      (*LM_ARGS, "--fake-devices", "1", "--strategy", "shard_map"))
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
  assert "strategy shard_map on 1" in reference.stdout
  ours, theirs = loss_curve(out), loss_curve(reference.stdout)
  assert len(ours) == 4, out
  assert_same_to_last_digit(ours, theirs)


# A small transformer whose big matrices have at least 4,096 elements, so that
# their moments are quantized: 200 steps take the loss from 4.08 (uniform) to
# about 2.45.
LM_QUANTIZED_ARGS = ("--steps", "200", "--log-every", "200", "--batch-size",
                     "16", "--seq-len", "32", "--d-model", "64", "--layers",
                     "1", "--heads", "2", "--sample-chars", "0",
                     "--fake-devices", "1")


def test_train_lm_quantized_moments_converge_like_float32():
  """q8 and q4 moments (mu and nu) against float32 moments, same seed and
  batches: the final validation loss within 2% (q8) and 4% (q4)."""
  runs = run_examples("train_lm.py", *(
      (*LM_QUANTIZED_ARGS, "--mu-dtype", fmt, "--nu-dtype", fmt)
      for fmt in ("float32", "q8", "q4")))
  outs = dict(zip(("float32", "q8", "q4"), (r.stdout for r in runs)))
  for fmt, out in outs.items():
    assert f"jadam.adamw (mu {fmt}, nu {fmt}, layout=tree)" in out, out
  # Really quantized: mu and nu of the attention's query, key, value and
  # output kernels (4,096 elements each) and of the MLP's two kernels (64 x
  # 256); the embeddings (59 x 64, 32 x 64), biases and LayerNorm scales are
  # smaller and keep float32 moments.
  assert quantized_moments(outs["float32"]) == 0
  assert quantized_moments(outs["q8"]) == quantized_moments(outs["q4"]) == 12
  state = {fmt: read_float(r"^optimizer state: .* \(([\d.]+) B/param\)", out)
           for fmt, out in outs.items()}
  assert state["float32"] == 8.0 and state["float32"] > state["q8"] > state["q4"]

  final = {fmt: read_float(r"^step +200  train loss [\d.]+  val loss ([\d.]+)$",
                           out) for fmt, out in outs.items()}
  assert final["float32"] < 2.6, final  # it trained (uniform: 4.08)
  for fmt, tolerance in (("q8", 0.02), ("q4", 0.04)):
    gap = abs(final[fmt] - final["float32"]) / final["float32"]
    assert gap <= tolerance, (fmt, final)


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
