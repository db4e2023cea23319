"""The watchdog of a fail-fast multi-process run (see :mod:`._runtime`):
:class:`WorkerLostError`, and ``_Run``, which polls the coordination
service for live processes, turns an ``abort()`` of a lost peer into the
error, raises it in the main thread and ends the process after a grace
period."""

from __future__ import annotations

import _thread
import ctypes
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings

import jax

# sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to
# retry"): the run can restart from its last checkpoint.
WORKER_LOST_EXIT_CODE = 75

_KEY_PREFIX = "jadam_parallel"
# What JAX raises when a computation fails (XlaRuntimeError in older JAX).
RUNTIME_ERRORS = tuple(
    e for e in (getattr(jax.errors, "JaxRuntimeError", None),
                getattr(jax.errors, "XlaRuntimeError", None)) if e) or (
                    RuntimeError,)


class WorkerLostError(RuntimeError):
  """A process of a multi-process run stopped responding.

  Attributes:
    processes: the ids of the lost processes.
    num_processes: the number of processes in the run.
    reason: how the loss was detected.
  """

  def __init__(self, processes, num_processes: int, reason: str,
               coordinator: str | None = None):
    self.processes = tuple(processes)
    self.num_processes = num_processes
    self.reason = reason
    self.coordinator = coordinator
    ids = ", ".join(str(p) for p in self.processes)
    what = "process" if len(self.processes) == 1 else "processes"
    role = (f" (the coordinator, {coordinator})"
            if coordinator and 0 in self.processes else "")
    super().__init__(f"{what} {ids} of {num_processes}{role} stopped "
                     f"responding ({reason})")

  def __reduce__(self):
    return type(self), (self.processes, self.num_processes, self.reason,
                        self.coordinator)


WorkerLostError.__module__ = "jadam.parallel"  # as users name it


def _say(text: str) -> None:
  """Writes to fd 2 directly: callable from any thread, even one JAX has
  started aborting, without taking ``sys.stderr``'s lock."""
  try:
    os.write(2, text.encode("utf-8", "replace"))
  except OSError:
    pass


def _reachable(address: str, timeout: float = 1.0) -> bool:
  """Whether something accepts TCP connections at ``host:port``."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout):
      return True
  except (OSError, ValueError):
    return False


def exit_lost() -> None:
  """Flushes stdout and stderr and ends the process with
  :data:`WORKER_LOST_EXIT_CODE` at once (JAX's exit handlers would contact
  the lost peers: hang or abort)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(WORKER_LOST_EXIT_CODE)


class _Run:
  """One fail-fast run: the client, the watchdog and the handlers."""

  def __init__(self, state, client, process_id: int, num_processes: int,
               coordinator: str, heartbeat_timeout: int, grace_period: float,
               shutdown_timeout: float):
    self.state = state  # jax.distributed's global state
    self.client = client
    self.process_id = process_id
    self.num_processes = num_processes
    self.coordinator = coordinator
    self.heartbeat_timeout = heartbeat_timeout
    self.grace_period = grace_period
    self.shutdown_timeout = shutdown_timeout
    self.poll_interval = min(1.0, heartbeat_timeout / 10)
    self.lock = threading.Lock()
    self.error: WorkerLostError | None = None
    self.delivered = False
    self.stopping = threading.Event()
    self.draining = False
    self.watchdog: threading.Thread | None = None
    self.main_ident = threading.main_thread().ident
    self.interrupt_signal = None
    self.previous_interrupt_handler = None
    self.libc = None
    self.abort_hook = None  # kept alive for good: C may still call it
    self.previous_abort_handler = None

  # --- detection -------------------------------------------------------------

  def watch(self) -> None:
    """The watchdog thread: polls the service for live processes."""
    ids = list(range(self.num_processes))
    while True:
      try:
        live = set(self.client.get_live_nodes(ids))
      except Exception:  # pylint: disable=broad-except
        if (self.stopping.is_set() or self.error is not None
            or self.state.client is not self.client):  # shut down by hand
          return
        if self.process_id != 0 and not _reachable(self.coordinator):
          self.declare_lost([0], "its coordination service at "
                            f"{self.coordinator} is unreachable")
          self.end_after_grace()
        time.sleep(self.poll_interval)
        continue
      missing = [p for p in ids if p not in live]
      if self.stopping.is_set():
        # At a clean exit, process 0 (which hosts the service) leaves once
        # the others have: get_live_nodes returns when they disconnect.
        if not self.draining or len(missing) == len(ids) - 1:
          return
        continue
      lost = [p for p in missing if not self.left(p)]
      if lost:
        self.declare_lost(lost, f"no heartbeat for {self.heartbeat_timeout} s, "
                          "or disconnected")
        self.end_after_grace()
      self.stopping.wait(self.poll_interval)

  def left(self, process: int) -> bool:
    """Whether ``process`` announced a clean exit (see :func:`shutdown`)."""
    try:
      self.client.key_value_try_get(f"{_KEY_PREFIX}/left/{process}")
      return True
    except Exception:  # pylint: disable=broad-except
      return False

  def on_abort(self, signum: int) -> None:
    """The C-level SIGABRT handler: something in this process called
    ``abort()`` (JAX's client on a lost coordinator; gloo's I/O thread on a
    garbled message from a dying peer: ``std::terminate``).

    Runs in the aborting thread. A lost coordinator (its port refuses
    connections) is declared at once; otherwise the watchdog's verdict is
    awaited for one detection time. A lost process becomes a
    :class:`WorkerLostError` and the handler never returns (returning lets
    ``abort()`` end the process); with no process lost, the abort goes on.
    """
    try:
      if self.stopping.is_set():
        return self.chain_abort(signum)
      in_main = threading.get_ident() == self.main_ident
      if in_main:
        self.delivered = True  # no exception may leave this C-level handler
      if self.error is None:
        if self.process_id != 0 and not _reachable(self.coordinator):
          self.declare_lost([0], "its coordination service at "
                            f"{self.coordinator} closed the connection")
        else:
          self.await_verdict()
      if self.error is None:
        _say("jadam.parallel: no process was lost; letting the abort go on\n")
        return self.chain_abort(signum)
      if in_main:
        self.end()  # no other thread would ever end the process
      self.end_after_grace()
    except BaseException:  # pylint: disable=broad-except
      return None

  def chain_abort(self, signum: int) -> None:
    """Calls the SIGABRT handler installed before ours, if any (Python's
    ``faulthandler`` dumps the stacks), then returns to ``abort()``."""
    previous = self.previous_abort_handler
    if previous not in (None, 0, 1):  # SIG_DFL, SIG_IGN
      ctypes.CFUNCTYPE(None, ctypes.c_int)(previous)(signum)

  def await_verdict(self) -> None:
    """Waits until the watchdog declares a loss or one detection time (the
    heartbeat timeout and a few polls) has passed."""
    deadline = (time.monotonic() + self.heartbeat_timeout
                + 4 * self.poll_interval)
    while self.error is None and time.monotonic() < deadline:
      if self.watchdog is None or not self.watchdog.is_alive():
        return
      time.sleep(self.poll_interval / 2)

  # --- reaction --------------------------------------------------------------

  def declare_lost(self, processes, reason: str) -> None:
    """Records the loss (once) and raises it in the main thread."""
    with self.lock:
      if self.error is not None:
        return
      self.error = WorkerLostError(processes, self.num_processes, reason,
                                   self.coordinator)
    _say(f"jadam.parallel: {self.error}. Raising WorkerLostError in the main "
         f"thread; this process ends with exit code {WORKER_LOST_EXIT_CODE} "
         f"in {self.grace_period:g} s at the latest.\n")
    if self.interrupt_signal is not None:
      try:
        # A real signal also cuts short a sleep or select in the main thread.
        signal.pthread_kill(self.main_ident, self.interrupt_signal)
      except (AttributeError, OSError):
        _thread.interrupt_main(self.interrupt_signal)

  def on_interrupt(self, signum, frame):
    """Python-level handler of the interrupt signal, in the main thread."""
    if self.error is not None and not self.delivered:
      self.delivered = True
      raise self.error
    previous = self.previous_interrupt_handler
    if callable(previous):
      return previous(signum, frame)
    return None

  def end_after_grace(self) -> None:
    """Ends the process ``grace_period`` s from now; never returns."""
    time.sleep(self.grace_period)
    self.end()

  def end(self) -> None:
    """Prints the error with the main thread's stack and ends the process."""
    frames = sys._current_frames()  # pylint: disable=protected-access
    frame = frames.get(self.main_ident)
    stack = "".join(traceback.format_stack(frame)) if frame else ""
    _say(f"Traceback of the main thread (most recent call last):\n{stack}"
         f"jadam.parallel.WorkerLostError: {self.error}\n"
         f"jadam.parallel: ending this process with exit code "
         f"{WORKER_LOST_EXIT_CODE} (the distributed runtime is unusable "
         f"after a lost process).\n")
    exit_lost()

  # --- handlers --------------------------------------------------------------

  def install_handlers(self) -> None:
    if threading.get_ident() != self.main_ident:
      warnings.warn("jadam.parallel.initialize was called outside the main "
                    "thread: a lost process ends this one after the grace "
                    "period instead of raising WorkerLostError", stacklevel=3)
    else:
      # A signal number of our own: interrupt_main runs its Python handler in
      # the main thread (no OS signal is sent).
      sig = getattr(signal, "SIGRTMAX", None) or getattr(signal, "SIGUSR2",
                                                         None)
      if sig is not None:
        self.previous_interrupt_handler = signal.signal(sig, self.on_interrupt)
        self.interrupt_signal = sig
    if os.name == "posix":
      # JAX aborts from its own threads: a C-level handler runs there; a
      # Python one (signal.signal) would only run after abort() has ended
      # the process.
      self.libc = ctypes.CDLL(None)
      self.libc.signal.restype = ctypes.c_void_p
      self.libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
      self.abort_hook = ctypes.CFUNCTYPE(None, ctypes.c_int)(self.on_abort)
      self.previous_abort_handler = self.libc.signal(
          signal.SIGABRT, ctypes.cast(self.abort_hook, ctypes.c_void_p))

  def restore_handlers(self) -> None:
    if self.libc is not None:
      self.libc.signal(signal.SIGABRT, self.previous_abort_handler)
      self.libc = None
    if self.interrupt_signal is not None:
      try:
        signal.signal(self.interrupt_signal,
                      self.previous_interrupt_handler or signal.SIG_DFL)
      except ValueError:  # not in the main thread
        pass
      self.interrupt_signal = None
