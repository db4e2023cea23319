"""Fail fast when a process dies: 2 real processes (joined by
``jadam.parallel.initialize`` over 127.0.0.1, gloo, 2 CPU devices each) train
with ``DataParallel``; the test kills one with SIGKILL after a few steps and
measures how the other ends.
The workers use ``heartbeat_timeout=5`` (the library's default is 10 s).

Without ``jadam.parallel.initialize`` the survivor hangs in its collective and
is aborted (SIGABRT) by JAX's distributed service after
``heartbeat_timeout_seconds`` (100 s by default), or at once when the dead
process is the coordinator: no ``except`` block ever runs.
"""

from __future__ import annotations

import inspect
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import jax
import pytest

import jadam.parallel
from jadam.parallel import _runtime
from test_multiprocess import clean_env, free_port

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "_fault_worker.py"
STEPS_BEFORE_KILL = 3
START_TIMEOUT_S = 90  # both processes up and training (2 shared cores)
DETECTION_LIMIT_S = 15  # from the kill to the survivor's exit


def _start(tmp_path, options=(), per_process=None):
  """Starts the 2 workers; ``per_process[i]``: more arguments for worker i."""
  coordinator = f"127.0.0.1:{free_port()}"
  procs, logs = [], []
  for i in range(2):
    out, err = tmp_path / f"proc{i}.out", tmp_path / f"proc{i}.err"
    logs.append((out, err))
    command = [sys.executable, str(WORKER), "--process-id", str(i),
               "--coordinator", coordinator, *options,
               *(per_process or {}).get(i, ())]
    with open(out, "wb") as o, open(err, "wb") as e:
      procs.append(subprocess.Popen(command, stdout=o, stderr=e,
                                    env=clean_env(), cwd=HERE.parent))
  return procs, logs


def _stop(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def _steps_done(out: pathlib.Path) -> int:
  return sum(line.startswith("step ")
             for line in out.read_text(errors="replace").splitlines())


def _report(procs, logs) -> str:
  parts = []
  for i, (p, (out, err)) in enumerate(zip(procs, logs)):
    # Drop the runtime's logging and C++ stack frames; keep our lines.
    text = [l for l in err.read_text(errors="replace").splitlines()
            if not l.startswith(("[Gloo]", "I0", "W0", "    @"))]
    parts.append(f"--- process {i} (exit {p.poll()}) stdout tail:\n"
                 + "\n".join(out.read_text(errors="replace").splitlines()[-5:])
                 + f"\n--- process {i} stderr tail:\n" + "\n".join(text[-30:]))
  return "\n".join(parts)


def _kill_after_steps(procs, logs, victim: int) -> float:
  """Waits until both processes have trained a few steps, then SIGKILLs
  ``victim``; returns the time of the kill."""
  deadline = time.monotonic() + START_TIMEOUT_S
  while min(_steps_done(out) for out, _ in logs) < STEPS_BEFORE_KILL:
    if any(p.poll() is not None for p in procs):
      raise AssertionError("a process ended before training:\n"
                           + _report(procs, logs))
    if time.monotonic() > deadline:
      raise AssertionError(f"not training after {START_TIMEOUT_S} s:\n"
                           + _report(procs, logs))
    time.sleep(0.05)
  procs[victim].send_signal(signal.SIGKILL)
  return time.monotonic()


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_survivor_raises_worker_lost_error(tmp_path, victim):
  """The survivor ends within 15 s of the kill, by its own exit (not
  SIGABRT, not a hang), naming the lost process; here the error reached the
  training loop's ``except`` (the worker prints ``handled: ...``)."""
  procs, logs = _start(tmp_path)
  survivor = 1 - victim
  try:
    killed_at = _kill_after_steps(procs, logs, victim)
    try:
      code = procs[survivor].wait(timeout=DETECTION_LIMIT_S + 15)
    except subprocess.TimeoutExpired:
      code = None
    took = time.monotonic() - killed_at
    report = _report(procs, logs)
    assert code is not None, f"still running after {took:.1f} s\n{report}"
    print(f"survivor {survivor} ended {took:.1f} s after process {victim} "
          f"was killed, exit code {code}")
    assert code != -signal.SIGABRT, f"aborted\n{report}"
    assert code == jadam.parallel.WORKER_LOST_EXIT_CODE, report
    assert took <= DETECTION_LIMIT_S, f"took {took:.1f} s\n{report}"
    role = " (the coordinator, 127.0.0.1:" if victim == 0 else " stopped"
    message = f"process {victim} of 2{role}"
    err = logs[survivor][1].read_text(errors="replace")
    assert f"jadam.parallel.WorkerLostError: {message}" in err, report
    # Raised in the main thread, inside the blocked step, and caught there.
    out = logs[survivor][0].read_text(errors="replace")
    assert f"handled: {message}" in out, report
  finally:
    _stop(procs)


def test_a_main_thread_stuck_in_jax_is_ended(tmp_path):
  """Process 0 waits in a JAX call that no exception can reach when process
  1 is killed: the watchdog prints the error with the main thread's stack
  and ends it with WORKER_LOST_EXIT_CODE after the grace period (1 s)."""
  procs, logs = _start(tmp_path, ["--grace-period", "1"],
                       {0: ["--block-after", str(STEPS_BEFORE_KILL)]})
  try:
    deadline = time.monotonic() + START_TIMEOUT_S
    while "blocked" not in logs[0][0].read_text():
      assert procs[0].poll() is None and time.monotonic() < deadline, (
          _report(procs, logs))
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code = procs[0].wait(timeout=DETECTION_LIMIT_S + 15)
    took = time.monotonic() - killed_at
    report = _report(procs, logs)
    print(f"stuck process 0 ended {took:.1f} s after the kill, exit {code}")
    assert code == jadam.parallel.WORKER_LOST_EXIT_CODE, report
    assert took <= DETECTION_LIMIT_S, f"took {took:.1f} s\n{report}"
    err = logs[0][1].read_text(errors="replace")
    assert "Traceback of the main thread (most recent call last)" in err, (
        report)
    assert "blocking_key_value_get(" in err, report  # where it was stuck
    assert ("jadam.parallel.WorkerLostError: process 1 of 2 stopped "
            "responding (no heartbeat for 5 s, or disconnected)") in err, (
                report)
    assert "handled:" not in logs[0][0].read_text(), report
  finally:
    _stop(procs)


def test_a_finished_run_leaves_cleanly(tmp_path):
  """Both processes train to the end; process 1 then idles 6 s (more than
  the 5 s heartbeat timeout) before leaving: alive but in no collective, it
  is not lost, and process 0 (which hosts the coordination service) waits
  for it at shutdown. Both exit 0."""
  procs, logs = _start(tmp_path, ["--steps", "5"], {1: ["--linger", "6"]})
  try:
    codes = [p.wait(timeout=START_TIMEOUT_S) for p in procs]
    report = _report(procs, logs)
    assert codes == [0, 0], report
    for out, err in logs:
      assert out.read_text().splitlines()[-1] == "done", report
      assert "WorkerLostError" not in err.read_text(errors="replace"), report
  finally:
    _stop(procs)


# In this process, no distributed runtime: arguments and messages.


def test_worker_lost_error_names_the_processes():
  e = jadam.parallel.WorkerLostError([1], 4, "no heartbeat for 5 s")
  assert str(e) == "process 1 of 4 stopped responding (no heartbeat for 5 s)"
  assert isinstance(e, RuntimeError) and e.processes == (1,)
  e = jadam.parallel.WorkerLostError([0, 2], 4, "why", coordinator="h:1")
  assert str(e) == ("processes 0, 2 of 4 (the coordinator, h:1) stopped "
                    "responding (why)")
  assert str(pickle.loads(pickle.dumps(e))) == str(e)
  assert jadam.parallel.worker_lost() is None


@pytest.mark.parametrize("name, value", [
    ("heartbeat_timeout", 0), ("heartbeat_timeout", float("inf")),
    ("grace_period", -1), ("shutdown_timeout", "10"),
    ("initialization_timeout", True)])
def test_initialize_checks_its_timeouts(name, value):
  # Checked before anything reaches JAX (whose backends run in this process).
  with pytest.raises(ValueError, match=rf"initialize\({name}=\.\.\.\) must "
                     rf"be a finite number of seconds >= \d, got "):
    jadam.parallel.initialize("127.0.0.1:1", 2, 0, **{name: value})


def test_jax_keywords_follow_the_jax_signature(monkeypatch):
  assert _runtime._jax_keywords(heartbeat_timeout=5, shutdown_timeout=7) == {
      "heartbeat_timeout_seconds": 5, "shutdown_timeout_seconds": 7}

  def renamed(coordinator_address=None, *, heartbeat_timeout=None):
    del coordinator_address, heartbeat_timeout

  monkeypatch.setattr(jax.distributed, "initialize", renamed)
  assert "heartbeat_timeout" in inspect.signature(renamed).parameters
  with pytest.warns(UserWarning, match="takes no shutdown_timeout"):
    got = _runtime._jax_keywords(heartbeat_timeout=5, shutdown_timeout=7)
  assert got == {"heartbeat_timeout": 5}
