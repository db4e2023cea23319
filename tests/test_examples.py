"""The example programs run end to end (briefly) and print what they promise.

Each runs as a subprocess with a small ``--steps``, a timeout, and fake CPU
devices; the assertions read its stdout and compare its numbers with a
reference run of the same program: optax's optimizer, or one device, or (for
a run killed with SIGKILL after a checkpoint and started again) the same run
uninterrupted. Argument errors are checked with ``parse_args`` alone.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import jadam.checkpoint  # noqa: E402
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
  library and the examples' own ``_cli``: JAX starts in ``main``)."""
  if str(EXAMPLES) not in sys.path:  # as when run as a script
    sys.path.insert(0, str(EXAMPLES))
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


# ---------------------------------------------------------------------------
# Exact resume after kill -9, and argument checks.


def start_example(name: str, args, out: pathlib.Path) -> subprocess.Popen:
  """Starts ``name`` with its stdout and stderr in ``out.stdout`` and
  ``out.stderr`` (files: a pipe nobody reads could stall it)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
    return subprocess.Popen([sys.executable, str(EXAMPLES / name), *args],
                            env=env, stdout=stdout, stderr=stderr, text=True)


def finished(popen: subprocess.Popen,
             out: pathlib.Path) -> subprocess.CompletedProcess:
  """Waits for a run of :func:`start_example` and reads its output."""
  popen.wait(timeout=TIMEOUT_S)
  return subprocess.CompletedProcess(
      popen.args, popen.returncode, pathlib.Path(f"{out}.stdout").read_text(),
      pathlib.Path(f"{out}.stderr").read_text())


def kill_after_checkpoint(runs: dict, timeout: float = TIMEOUT_S) -> None:
  """SIGKILLs each run of ``runs`` (name -> (popen, checkpoint dir, step))
  as soon as its checkpoint of ``step`` is complete (orbax renames it into
  place once written)."""
  waiting = dict(runs)
  deadline = time.monotonic() + timeout
  while waiting:
    for name, (popen, ckpt_dir, step) in list(waiting.items()):
      if popen.poll() is not None:
        pytest.fail(f"{name} exited with {popen.returncode} before it was "
                    f"killed after its checkpoint of step {step}")
      if (ckpt_dir / str(step)).is_dir():
        popen.send_signal(signal.SIGKILL)
        popen.wait(timeout=30)
        del waiting[name]
    if time.monotonic() > deadline:
      pytest.fail(f"{', '.join(waiting)}: no checkpoint after {timeout} s")
    time.sleep(0.002)


# Every --save-every steps a checkpoint; the run is killed once the second
# one is complete (and 40 more steps would follow), then started again with
# the same command. LM: a tiny transformer, ZeRO-1 over 8 devices; --log-every
# divides --save-every, so that even the training losses are the same.
RESUME_CASES = {
    "train_lm zero1": ("train_lm.py", (
        "--fake-devices", "8", "--strategy", "zero1", "--steps", "60",
        "--log-every", "10", "--batch-size", "8", "--seq-len", "32",
        "--d-model", "32", "--layers", "1", "--heads", "2",
        "--sample-chars", "0")),
    # Local steps (the replicas and their inner states, mid-period at step
    # 20) in float16 with a dynamic loss scale. The learning rate is large so
    # that the gradients overflow: at step 8 (the checkpoint holds a halved
    # scale) and at step 41 (after the resume).
    "train_digits local float16": ("train_digits.py", (
        "--fake-devices", "4", "--strategy", "local", "--steps", "60",
        "--batch-size", "64", "--hidden", "32", "--eval-every", "10",
        "--param-dtype", "float16", "--loss-scale", "dynamic",
        "--learning-rate", "0.3")),
}
SAVE_EVERY, KILL_AFTER = 10, 20


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
  """Per case: the stdout of an uninterrupted run (``"reference"``), and
that of the same command with a checkpoint directory (``"command"``,
``"ckpt_dir"``), killed and started again (``"resumed"``)."""
  tmp = tmp_path_factory.mktemp("resume")
  started = []

  def start(name, args, out):
    started.append(start_example(name, args, out))
    return started[-1]

  try:
    references, killed, ckpt_args = {}, {}, {}
    for i, (case, (name, args)) in enumerate(RESUME_CASES.items()):
      ckpt_args[case] = (*args, "--checkpoint-dir", str(tmp / f"ckpt{i}"),
                         "--save-every", str(SAVE_EVERY))
      references[case] = start(name, args, tmp / f"reference{i}")
      killed[case] = (start(name, ckpt_args[case], tmp / f"killed{i}"),
                      tmp / f"ckpt{i}", KILL_AFTER)
    kill_after_checkpoint(killed)
    for case, (popen, _, _) in killed.items():
      assert popen.returncode == -signal.SIGKILL, (case, popen.returncode)
    resumed = {case: start(name, ckpt_args[case], tmp / f"resumed{i}")
               for i, (case, (name, _)) in enumerate(RESUME_CASES.items())}
    out = {}
    for i, case in enumerate(RESUME_CASES):
      runs = (finished(references[case], tmp / f"reference{i}"),
              finished(resumed[case], tmp / f"resumed{i}"))
      for run in runs:
        assert run.returncode == 0, (
            f"{case}: {' '.join(run.args[1:])} exited with {run.returncode}\n"
            f"stdout:\n{run.stdout}\nstderr:\n{run.stderr[-4000:]}")
      out[case] = {"reference": runs[0].stdout, "resumed": runs[1].stdout,
                   "command": (RESUME_CASES[case][0], ckpt_args[case]),
                   "ckpt_dir": tmp / f"ckpt{i}"}
    return out
  finally:
    for popen in started:
      if popen.poll() is None:
        popen.kill()
        popen.wait()


def without(pattern: str, out: str) -> str:
  return re.sub(pattern, "", out, flags=re.M)


def assert_resumed_prints_the_same(reference: str, resumed: str) -> int:
  """The resumed run's stdout is the reference's from the resumed step on
  (its loss lines, the sample, the final numbers), but the wall time;
  returns that step."""
  resumed_at = re.search(r"^resumed at step (\d+) from .*$", resumed, re.M)
  assert resumed_at, resumed
  assert resumed.splitlines()[-1] == reference.splitlines()[-1]  # final loss
  # The resumed run prints no loss lines of the steps it restored.
  done = "|".join(str(s) for s in range(1, int(resumed_at[1]) + 1))
  wall_time = r"^wall time: [\d.]+ s\n"
  assert (without(wall_time + "|" + re.escape(resumed_at[0]) + r"\n", resumed)
          == without(wall_time + rf"|^step +({done})  train loss .*\n", reference))
  return int(resumed_at[1])


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_kill_prints_the_uninterrupted_run(resumed_runs, case):
  """Started again with the same command after a kill -9 once its second
  checkpoint was written, the example resumes from its newest checkpoint
  (params, optimizer state with the strategy's own state and the loss
  scale, step, the data stream's position) and prints what the run without
  checkpoints printed from there on: the same final loss, and every other
  line but the wall time."""
  reference, resumed = resumed_runs[case]["reference"], resumed_runs[case]["resumed"]
  assert re.search(r"^final loss: \d+\.\d{6}\n\Z", reference, re.M), reference
  step = assert_resumed_prints_the_same(reference, resumed)
  assert KILL_AFTER <= step < 60, resumed
  if case.startswith("train_lm"):
    assert len(loss_curve(reference)) == 2 * 6  # train and val every 10 steps
  else:
    # The checkpoint held a loss scale halved by an overflow (and the same
    # steps were skipped: the "loss scale" lines are the same).
    scale = read_float(r"^resumed at step \d+ from .*, loss scale (\d+)$", resumed)
    assert scale < 2**15, resumed
    assert read_float(r"^loss scale: (\d+) at the end", reference) <= scale


@pytest.mark.skipif(not hasattr(jadam.checkpoint, "CheckpointCorruptError"),
                    reason="this jadam.checkpoint does not verify checkpoints")
def test_resume_skips_a_damaged_checkpoint(resumed_runs):
  """The finished run's directory with its newest checkpoint (step 60)
  damaged: the same command again resumes from step 50, saves step 60 over
  the damaged one, and prints the uninterrupted run's numbers."""
  run = resumed_runs["train_lm zero1"]
  newest = run["ckpt_dir"] / "60"
  assert newest.is_dir()
  data = max((p for p in (newest / "opt_state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  damaged = bytearray(data.read_bytes())
  middle = len(damaged) // 2
  damaged[middle:middle + 16] = bytes(b ^ 0xFF for b in damaged[middle:middle + 16])
  data.write_bytes(damaged)
  name, args = run["command"]
  again = run_example(name, *args)
  assert assert_resumed_prints_the_same(run["reference"], again.stdout) == 50
  assert newest.is_dir() and not (data.exists() and data.read_bytes() == damaged)


# Both examples refuse these ...
BAD_ARGUMENTS = [
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["--steps", "-1"], "argument --steps: expected a positive integer, got '-1'"),
    (["--steps", "1.5"], "argument --steps: expected a positive integer, got '1.5'"),
    (["--fake-devices", "-2"],
     "argument --fake-devices: expected a positive integer, got '-2'"),
    (["--fake-devices", "0"],
     "argument --fake-devices: expected a positive integer, got '0'"),
    (["--batch-size", "0"],
     "argument --batch-size: expected a positive integer, got '0'"),
    (["--learning-rate", "-0.001"],
     "argument --learning-rate: expected a positive number, got '-0.001'"),
    (["--learning-rate", "nan"],
     "argument --learning-rate: expected a positive number, got 'nan'"),
    (["--weight-decay", "-1"],
     "argument --weight-decay: expected a non-negative number, got '-1'"),
    (["--seed", "-1"], "argument --seed: expected a non-negative integer, got '-1'"),
    (["--checkpoint-dir", "d", "--save-every", "0"],
     "argument --save-every: expected a positive integer, got '0'"),
    (["--save-every", "5"], "--save-every needs --checkpoint-dir"),
    (["--batch-size", "36", "--fake-devices", "8"],
     "--batch-size 36 must be a multiple of --fake-devices 8 (every device "
     "takes an equal share of the batch)"),
]
# ... and each its own.
BAD_ARGUMENTS_OF = {
    "train_lm.py": [
        (["--heads", "3"], "--heads 3 must divide --d-model 128"),
        (["--inner-steps", "0"],
         "argument --inner-steps: expected a positive integer, got '0'"),
        (["--warmup-steps", "0"],
         "argument --warmup-steps: expected a positive integer, got '0'"),
        (["--outer-momentum", "1"],
         "argument --outer-momentum: expected a number in [0, 1), got '1'"),
        (["--log-every", "0"],
         "argument --log-every: expected a positive integer, got '0'"),
        (["--sample-chars", "-1"],
         "argument --sample-chars: expected a non-negative integer, got '-1'"),
        (["--temperature", "0"],
         "argument --temperature: expected a positive number, got '0'"),
    ],
    "train_digits.py": [
        (["--eval-every", "0"],
         "argument --eval-every: expected a positive integer, got '0'"),
        (["--hidden", "0"],
         "argument --hidden: expected a positive integer, got '0'"),
        (["--batch-size", "1440"], "argument --batch-size: expected at most "
         "the 1437 training images, got 1440"),
        (["--loss-scale", "-8"], "argument --loss-scale: expected 'dynamic' "
         "or a positive number, got '-8'"),
        (["--loss-scale", "big"], "argument --loss-scale: expected 'dynamic' "
         "or a positive number, got 'big'"),
    ],
}


@pytest.mark.parametrize("name, argv, message", [
    (name, argv, message) for name, own in BAD_ARGUMENTS_OF.items()
    for argv, message in BAD_ARGUMENTS + own])
def test_examples_refuse_bad_arguments(name, argv, message, capsys):
  """Counts that must be positive, and the rest, are argparse errors that
  name the flag and what it expects, before JAX starts."""
  example = load_example(name)
  with pytest.raises(SystemExit) as exit_info:
    example.parse_args(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"error: {message}\n" in err, err


@pytest.mark.parametrize("name", ["train_lm.py", "train_digits.py"])
def test_examples_checkpoint_arguments(name):
  example = load_example(name)
  args = example.parse_args(["--checkpoint-dir", "d"])
  assert (args.checkpoint_dir, args.save_every) == ("d", 100)
  args = example.parse_args(["--checkpoint-dir", "d", "--save-every", "7",
                             "--fake-devices", "4", "--batch-size", "64"])
  assert (args.save_every, args.fake_devices, args.batch_size) == (7, 4, 64)
  assert example.parse_args([]).checkpoint_dir is None
