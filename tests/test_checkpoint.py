"""jadam.checkpoint.Checkpointer: save on 8 devices, resume in fresh processes on
8 (bit-exact), 4 and 1 devices; other device counts, other models and other
layouts in-process; a process killed during a save."""

from __future__ import annotations

import pathlib
import pickle
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import jadam
import jadam.checkpoint
import jadam.parallel
from _trees import adam_node
import test_multiprocess as mp
from test_parallel import init_params
from test_parallel import make_batches
from test_parallel import mse

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "_ckpt_worker.py"
RTOL = 1e-5
ATOL = 1e-7


def setup_module():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices", allow_module_level=True)


def worker(mode, directory, out=None, devices=8):
  command = [sys.executable, str(WORKER), mode, "--dir", str(directory),
             "--devices", str(devices)]
  return command + (["--out", str(out)] if out else [])


def load(path) -> dict:
  with np.load(path) as f:
    return dict(f)


def test_resume_in_fresh_processes(tmp_path):
  ckpt_dir = tmp_path / "ckpt"
  outs = {name: tmp_path / name for name in ("train", "8", "1")}
  for out in outs.values():
    out.mkdir()
  # An uninterrupted run of 20 steps on 8 devices that saves after step 10 ...
  mp.run_processes([worker("train", ckpt_dir, outs["train"])], tmp_path, timeout=120)
  # ... resumed from that checkpoint in fresh processes on 8 and 1 devices
  # (zero1 onto 2 and 6 devices: test_round_trip_onto_other_device_counts, in
  # this process).
  mp.run_processes([worker("resume", ckpt_dir, outs[n], devices=int(n))
                    for n in ("8", "1")], tmp_path, timeout=120)
  for strategy in ("zero1", "zero2"):
    want = load(outs["train"] / f"{strategy}.npz")
    assert len(want["losses"]) == 10
    # The same devices: the very same trajectory, bit for bit.
    chex.assert_trees_all_equal(load(outs["8"] / f"{strategy}.npz"), want,
                                custom_message=f"{strategy} on 8 devices")
    # One device: the same steps, gradients summed in another order.
    chex.assert_trees_all_close(load(outs["1"] / f"{strategy}.npz"), want,
                                rtol=RTOL, atol=ATOL, custom_message=f"{strategy} on 1 device")


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
  env = mp.clean_env()
  with open(tmp_path / "err", "wb") as err:
    proc = subprocess.Popen(worker("kill", tmp_path, devices=1), stderr=err,
                            stdout=subprocess.DEVNULL, env=env, cwd=HERE.parent)
  try:
    deadline = time.monotonic() + 120
    while not (tmp_path / "saving-2").exists():
      if proc.poll() is not None:
        pytest.fail(f"worker exited with {proc.returncode}:\n"
                    + (tmp_path / "err").read_text()[-3000:])
      if time.monotonic() > deadline:
        pytest.fail("worker never reached the second save")
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  ckpt_dir = tmp_path / "ckpt"
  # It was killed mid-save: step 2 only exists as orbax's temporary directory.
  assert not (ckpt_dir / "2").exists(), "the save finished before the kill"
  assert any(p.name.startswith("2.") for p in ckpt_dir.iterdir())

  import _ckpt_worker  # pylint: disable=import-outside-toplevel
  ckpt = jadam.checkpoint.Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  trainer = jadam.parallel.DataParallel(
      _ckpt_worker.big_loss, _ckpt_worker.optimizer(), jax.make_mesh((8,), ("data",)),
      strategy="zero1")
  step, params, opt_state = ckpt.restore(trainer)
  assert step == 1
  chex.assert_trees_all_equal(trainer.gather(params), _ckpt_worker.big_params())
  assert int(adam_node(opt_state).count) == 0
  # The run goes on: step 2 saves again over the interrupted one.
  ckpt.save(2, params, opt_state)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  # What the killed save left was removed (orbax does it before a save).
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("2")) == ["2"]
  ckpt.close()


# ---------------------------------------------------------------------------
# In-process.


def make_trainer(strategy="zero1", n=8, **kwargs):
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  return jadam.parallel.DataParallel(mse, jadam.adam(1e-2), mesh,
                                     strategy=strategy, **kwargs)


def trained(strategy, steps=3):
  trainer = make_trainer(strategy)
  params, opt_state = trainer.init(init_params())
  for batch in make_batches(steps):
    params, opt_state, _ = trainer.step(params, opt_state, batch)
  return trainer, params, opt_state


@pytest.mark.parametrize("strategy", ["zero1", "shard_map", "jit", "pmap"])
def test_round_trip_onto_other_device_counts(tmp_path, strategy):
  trainer, params, opt_state = trained(strategy)
  want = trainer.gather((params, opt_state))
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, params, opt_state)
    ckpt.wait()
    # pmap keeps one replica per device: onto 2 or 6 devices, replica 0 is
    # read and copied to each of them.
    for n in (8, 2, 6):
      other = make_trainer(strategy, n)
      step, p, s = ckpt.restore(other)
      assert step == 3
      chex.assert_trees_all_equal(other.gather((p, s)), want,
                                  custom_message=f"{strategy} on {n} devices")
      if strategy == "pmap":  # one full replica on each of the n devices
        for x in jax.tree.leaves((p, s)):
          assert x.shape[0] == n and (np.asarray(x) == np.asarray(x)[:1]).all()
      if strategy == "zero1":
        (mu,) = adam_node(s).mu.values()
        # 6 does not divide 1024: the buffers were re-padded to 3072.
        assert mu.shape == ((3072,) if n == 6 else (1024,))
        assert mu.addressable_shards[0].data.shape == (mu.shape[0] // n,)


def test_another_model_is_refused(tmp_path):
  _, params, opt_state = trained("zero1")
  with jadam.checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, params, opt_state)
    ckpt.wait()
    bigger = init_params()
    bigger["w1"] = np.zeros((4, 32), np.float32)
    trainer = make_trainer()
    trainer.init(bigger)
    with pytest.raises(ValueError, match=r"does not match the params: \['w1'\] is "
                       r"\(4, 16\) float32 in the checkpoint, \(4, 32\) float32 here"):
      ckpt.restore(trainer)
    extra = {**init_params(), "w3": np.zeros((2,), np.float32)}
    with pytest.raises(ValueError, match=r"\['w3'\] \(\(2,\) float32\) is not in the "
                       r"checkpoint"):
      ckpt.restore(make_trainer(), like=extra)
    fewer = {k: v for k, v in init_params().items() if k != "b2"}
    with pytest.raises(ValueError, match=r"the checkpoint also has \['b2'\]"):
      ckpt.restore(make_trainer(), like=fewer)
    # A ZeRO state into a replicated trainer: another optimizer state layout.
    with pytest.raises(ValueError, match=r"optimizer state: .*mu\['b1'\].*is not in "
                       r"the checkpoint, which has .*mu\['float32'\].*strategy is 'jit'"):
      ckpt.restore(make_trainer("jit"))
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
      ckpt.restore(make_trainer(), step=7)


def test_max_to_keep_and_no_pickle(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("pickle was used")

  for name in ("dump", "dumps", "load", "loads"):
    monkeypatch.setattr(pickle, name, refuse)
  trainer, params, opt_state = trained("zero2")
  with jadam.checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(4):
      ckpt.save(step, params, opt_state)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    step, _, s = ckpt.restore(make_trainer("zero2"), step=2)
    assert step == 2 and int(adam_node(s).count) == 3
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    jadam.checkpoint.Checkpointer(tmp_path / "empty").restore(trainer)
  with pytest.raises(ValueError, match="max_to_keep"):
    jadam.checkpoint.Checkpointer(tmp_path, max_to_keep=0)
