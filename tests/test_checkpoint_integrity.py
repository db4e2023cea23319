"""jadam.checkpoint's integrity: a damaged checkpoint (bytes overwritten inside a
data file, a file truncated or deleted, an undecodable chunk) raises
CheckpointCorruptError naming the step, the array and the file; restore()
falls back to the newest intact step; saving over saved steps raises; an
unwritable directory fails at once and the process still exits; two
processes write and check the checksums of their own shards."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jadam
import jadam.checkpoint
import jadam.parallel
from _ckpt_worker import chunk_location
from _ckpt_worker import optimizer
from _ckpt_worker import overwrite
from _ckpt_worker import wide_params
import test_multiprocess as mp
from test_parallel import make_batches
from test_parallel import mse

HERE = pathlib.Path(__file__).resolve().parent
Corrupt = jadam.checkpoint.CheckpointCorruptError


def setup_module():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices", allow_module_level=True)


def make_trainer(n=8, strategy="zero1", hidden=1024):
  """A trainer that has seen the params (the restores' template)."""
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  trainer = jadam.parallel.DataParallel(mse, optimizer(), mesh, strategy=strategy)
  trainer.init(wide_params(hidden))
  return trainer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """Steps 1 and 2 of a ZeRO-1 run on 8 devices, and their gathered values."""
  directory = tmp_path_factory.mktemp("pristine") / "ckpt"
  trainer = make_trainer()
  params, state = trainer.init(wide_params())
  values = {}
  with jadam.checkpoint.Checkpointer(directory) as ckpt:
    for step, batch in zip((1, 2), make_batches(2)):
      params, state, _ = trainer.step(params, state, batch)
      values[step] = trainer.gather((params, state))
      ckpt.save(step, params, state)
  return directory, values


@pytest.fixture
def run(pristine, tmp_path):
  """A copy of the pristine checkpoints to damage, its Checkpointer, values."""
  directory, values = pristine
  shutil.copytree(directory, tmp_path / "ckpt")
  with jadam.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    yield tmp_path / "ckpt", ckpt, values


def assert_names(error, step, array, file, reason):
  """The error names the step, the array and the file, and says why."""
  assert error.step == step and error.file == str(file), (error.step, error.file)
  assert array in error.array, error.array
  for text in (f"checkpoint step {step} in ", array, str(file)):
    assert text in str(error), (text, str(error))
  assert re.search(reason, str(error)), str(error)


def test_overwritten_bytes_are_caught_and_the_previous_step_restored(run):
  directory, ckpt, values = run
  item = directory / "2" / "opt_state"
  file, offset, length = chunk_location(item, "0.nu.float32/3")
  overwrite(file, offset + length // 2)
  trainer = make_trainer()
  # The fault: orbax alone reads other values and says nothing.
  with ocp.StandardCheckpointer() as plain:
    silent = trainer.gather(plain.restore(item, trainer.abstract_state()[1]))
  chex.assert_trees_all_equal_shapes_and_dtypes(silent, values[2][1])
  assert not all(map(np.array_equal, jax.tree.leaves(silent),
                     jax.tree.leaves(values[2][1])))

  # Caught, on this device count and on another (the checksum does not
  # depend on the sharding): the third of 8 saved shards of nu.
  for n in (8, 2):
    with pytest.raises(Corrupt) as e:
      ckpt.restore(make_trainer(n), step=2)
    assert_names(e.value, 2, "opt_state[0].nu['float32']", file,
                 r"its elements \[\d+:\d+\] differ from what was saved "
                 r"\(checksum [0-9a-f]{16}, saved [0-9a-f]{16}\)")
  # Without a step: a warning, and step 1 exactly as it was saved.
  with pytest.warns(UserWarning, match=r"step 2 .* is damaged: "
                    r"opt_state\[0\]\.nu\['float32'\].*skipping step 2, "
                    r"trying step 1"):
    step, params, state = ckpt.restore(trainer)
  assert step == 1
  chex.assert_trees_all_equal(trainer.gather((params, state)), values[1])


def test_truncated_and_deleted_files_are_named(run):
  directory, ckpt, values = run
  truncated, offset, length = chunk_location(directory / "2" / "params", "w1/0.3")
  os.truncate(truncated, offset + length // 2)
  deleted, _, _ = chunk_location(directory / "1" / "opt_state", "0.mu.float32/0")
  os.remove(deleted)
  trainer = make_trainer()
  with pytest.raises(Corrupt) as e:
    ckpt.restore(trainer, step=2)
  assert_names(e.value, 2, "params['w1']", truncated,
               r"the file is truncated: \d+ bytes, its data ends at byte \d+")
  with pytest.raises(Corrupt) as e:
    ckpt.restore(trainer, step=1)
  assert_names(e.value, 1, "opt_state[0].mu['float32']", deleted,
               "the file is missing")
  # No intact step: one warning per step, then an error naming both.
  with pytest.warns(UserWarning) as warned:
    with pytest.raises(Corrupt, match=rf"no intact checkpoint in {directory}: "
                       rf"step 2: .*params\['w1'\].*: {truncated}; "
                       rf"step 1: .*opt_state\[0\]\.mu\['float32'\].*: {deleted}"):
      ckpt.restore(trainer)
  assert [str(w.message).split(" in ")[0] for w in warned] == [
      "checkpoint step 2", "checkpoint step 1"]
  assert "no older step is left" in str(warned[1].message)
  del values


# orbax leaves the reads of the other chunks unawaited when one fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_undecodable_chunk_index_and_description(run):
  directory, ckpt, values = run
  file, offset, _ = chunk_location(directory / "2" / "opt_state", "0.mu.float32/1")
  overwrite(file, offset + 4)  # inside the chunk's zstd frame header
  trainer = make_trainer()
  with pytest.raises(Corrupt) as e:
    ckpt.restore(trainer, step=2)
  assert_names(e.value, 2, "opt_state[0].mu['float32']", file,
               r"its data cannot be decoded \(.*ZSTD")
  with pytest.warns(UserWarning, match="step 2 .* cannot be decoded"):
    step, params, state = ckpt.restore(trainer)
  assert step == 1
  chex.assert_trees_all_equal(trainer.gather((params, state)), values[1])
  gc.collect()  # orbax's unawaited reads: their warnings here, not later

  # The B+tree index (it carries tensorstore's own CRC-32C).
  (node,) = (directory / "1" / "params" / "d").iterdir()
  overwrite(node, 20)
  with pytest.raises(Corrupt) as e:
    ckpt.restore(trainer, step=1)
  assert_names(e.value, 1, "every array of params", node,
               "holds a B\\+tree node that cannot be decoded")
  # The description.
  description = directory / "1" / "layout" / "metadata"
  description.write_text("{")
  with pytest.raises(Corrupt) as e:
    ckpt.restore(trainer, step=1)
  assert_names(e.value, 1, "the description", description, "it cannot be read")


def test_version_1_checkpoint_restores_unverified(run):
  directory, ckpt, values = run
  description = directory / "2" / "layout" / "metadata"
  layout = json.loads(description.read_text())
  assert layout["version"] == 2 and layout["checksum"] == "sum-splitmix64-v1"
  # What jadam wrote before checksums: the same without them.
  layout["version"] = 1
  del layout["checksum"]
  for leaf in layout["params"] + layout["opt_state"]:
    del leaf["checksum"]
  description.write_text(json.dumps(layout))
  trainer = make_trainer()
  step, params, state = ckpt.restore(trainer)
  assert step == 2
  chex.assert_trees_all_equal(trainer.gather((params, state)), values[2])


def test_saving_over_saved_steps_raises_unless_overwrite(run):
  directory, ckpt, values = run
  trainer = make_trainer()
  params, state = trainer.init(wide_params())
  initial = trainer.gather((params, state))
  with pytest.raises(ValueError, match=r"`Checkpointer.save\(step=2\)`: .* already "
                     r"has a checkpoint of step 2; steps must increase .* Pass "
                     r"`overwrite=True` to delete \[2\]"):
    ckpt.save(2, params, state)
  with pytest.raises(ValueError, match=r"has checkpoints of steps \[1, 2\];.* "
                     r"or save under a step above 2"):
    ckpt.save(1, params, state)
  # Off the save interval nothing would be saved anyway: no error.
  with jadam.checkpoint.Checkpointer(directory, save_interval_steps=5) as sparse:
    assert not sparse.save(2, params, state)
  assert ckpt.save(2, params, state, overwrite=True)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  step, p, s = ckpt.restore(trainer)
  assert step == 2
  chex.assert_trees_all_equal(trainer.gather((p, s)), initial)
  # Back to step 1: the later step goes too.
  assert ckpt.save(1, p, s, overwrite=True)
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  chex.assert_trees_all_equal(trainer.gather(ckpt.restore(trainer)[1:]), initial)
  del values


def test_pmap_onto_another_device_count_checks_the_replica_it_reads(tmp_path):
  # A pmap state holds one replica per device; onto 2 devices replica 0 is
  # read (and checked), copied to both.
  trainer = make_trainer(8, "pmap", hidden=16)
  params, state = trainer.init(wide_params(hidden=16))
  want = trainer.gather((params, state))
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, params, state)
    ckpt.wait()
    description = tmp_path / "1" / "layout" / "metadata"
    layout = json.loads(description.read_text())
    (w1,) = [x for x in layout["params"] if x["path"] == "['w1']"]
    assert w1["checksum"]["splits"] == [list(range(8)), [0], [0]]
    # A wrong sum for replica 5: unread onto 2 devices, caught onto 8.
    w1["checksum"]["sums"][5] = "0" * 16
    description.write_text(json.dumps(layout))
    two = make_trainer(2, "pmap", hidden=16)
    chex.assert_trees_all_equal(two.gather(ckpt.restore(two)[1:]), want)
    with pytest.raises(Corrupt, match=r"params\['w1'\]: its elements "
                       r"\[5:6, 0:4, 0:16\] differ from what was saved"):
      ckpt.restore(make_trainer(8, "pmap", hidden=16), step=1)
    # A wrong sum for replica 0: caught onto 2 devices too.
    w1["checksum"]["sums"][0] = "0" * 16
    description.write_text(json.dumps(layout))
    with pytest.raises(Corrupt, match=r"\[0:1, 0:4, 0:16\] differ"):
      ckpt.restore(two, step=1)


UNWRITABLE = r"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
import jadam, jadam.checkpoint, jadam.parallel
mesh = jax.make_mesh((1,), ("data",))
trainer = jadam.parallel.DataParallel(lambda p, b: jnp.sum(p["w"] * b),
                                      jadam.adam(1e-3), mesh)
params, state = trainer.init({"w": np.ones((4,), np.float32)})
ckpt = jadam.checkpoint.Checkpointer(sys.argv[1])
if os.geteuid() == 0:  # root writes anywhere: become nobody, for whom
  try:                 # root's 0o755 directory is read-only
    os.seteuid(65534)
  except PermissionError:
    print("cannot drop root")
    sys.exit(0)
else:
  os.chmod(sys.argv[1], 0o500)
try:
  ckpt.save(1, params, state)
  ckpt.wait()
except PermissionError as e:
  print("PermissionError:", e)
print("finished", flush=True)
"""


def test_unwritable_directory_fails_at_once_and_the_process_exits():
  # Before the fix, orbax's writer threads waited 20 minutes for a step
  # directory that was never made: the interpreter did not exit.
  with tempfile.TemporaryDirectory() as top:
    os.chmod(top, 0o755)  # reachable by nobody
    directory = os.path.join(top, "ckpt")
    try:
      proc = subprocess.run([sys.executable, "-c", UNWRITABLE, directory],
                            capture_output=True, text=True, timeout=60,
                            env=mp.clean_env(), cwd=HERE.parent)
    finally:
      if os.path.exists(directory):
        os.chmod(directory, 0o755)
  if "cannot drop root" in proc.stdout:
    pytest.skip("running as root without the right to drop it")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(rf"PermissionError: \[Errno 13\] cannot write checkpoint "
                   rf"step 1 into {re.escape(directory)}: Permission denied",
                   proc.stdout), proc.stdout + proc.stderr[-3000:]
  assert proc.stdout.endswith("finished\n")


def test_two_processes_check_their_own_shards(tmp_path):
  # Each process hashes its own ZeRO shards; process 0 writes the sums of
  # both. Bytes of a shard written by process 1 are overwritten: both
  # processes see it, warn, and fall back to step 1 together.
  coordinator = f"127.0.0.1:{mp.free_port()}"
  mp.run_processes(
      [[sys.executable, str(HERE / "_ckpt_worker.py"), "two-processes",
        "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path),
        "--process-id", str(i), "--coordinator", coordinator] for i in range(2)],
      tmp_path, timeout=120)
  with np.load(tmp_path / "saved1.npz") as f:
    saved = dict(f)
  for process in range(2):
    warned = (tmp_path / f"warnings-{process}").read_text()
    assert re.fullmatch(
        r"checkpoint step 2 in .* is damaged: opt_state\[0\]\.mu\['float32'\]: "
        r"its elements \[\d+:\d+\] differ .*ocdbt\.process_1/d/[0-9a-f]+\); "
        r"skipping step 2, trying step 1", warned), warned
    with np.load(tmp_path / f"restored-{process}.npz") as f:
      chex.assert_trees_all_equal(dict(f), saved)
  # One process on 8 devices checks the sums the two processes wrote.
  trainer = make_trainer()
  with jadam.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    step, params, state = ckpt.restore(trainer, step=1)
  got = trainer.gather((params, state))
  chex.assert_trees_all_equal(
      {**{"params" + k: v for k, v in flat(got[0]).items()},
       **{"state" + k: v for k, v in flat(got[1]).items()}}, saved)


def flat(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
