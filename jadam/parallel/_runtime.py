"""Fail fast in multi-process runs: :func:`initialize` joins JAX's distributed
runtime so that when a process dies, the others raise :class:`WorkerLostError`
naming it within seconds, instead of hanging in a collective until JAX's
distributed service aborts them (SIGABRT, after 100 s by default).

What JAX 0.10 does by itself, measured with 2 processes on 127.0.0.1 (gloo):

* A process is killed: the survivor's collective fails at once ("Connection
  reset by peer"), or waits on the dead peer (a fresh gloo context waits 30 s
  for its address; a running all-reduce waited over 160 s), or gloo's I/O
  thread calls ``std::terminate`` on a garbled message. After
  ``heartbeat_timeout_seconds`` the coordination service tells every client,
  and each client ends its process with a fatal log and ``abort()``.
* The coordinator (process 0, which hosts the service) is killed: each other
  client's error poll fails at once and it aborts within 0.2 s.

None leaves Python a chance to run an ``except`` block. The runtime's
``missed_heartbeat_callback`` cannot be a Python function in jaxlib 0.10 (its
``absl::Status`` argument has no Python conversion: ``std::bad_cast``, then
``std::terminate``). So :func:`initialize`:

1. sets ``jax_enable_recoverability`` (the service then records a dead
   process instead of aborting everyone), a short heartbeat timeout, and gloo
   CPU collectives;
2. starts a watchdog thread that asks the service which processes are alive
   (``get_live_nodes``, every ``min(1, heartbeat_timeout / 10)`` s);
3. installs a C-level SIGABRT handler: an ``abort()`` from a lost
   coordinator (its port refuses connections) is a loss at once; any other
   waits for the watchdog's verdict, and goes on as an abort if nobody was
   lost;
4. on a loss, raises :class:`WorkerLostError` in the main thread (a signal of
   its own whose Python handler raises: it arrives at the next bytecode, and
   inside JAX's cancellable waits such as ``block_until_ready``), and ends
   the process with :data:`WORKER_LOST_EXIT_CODE` ``grace_period`` seconds
   later if it is still alive (its main thread may be blocked where no
   exception reaches it, and JAX's exit handlers would hang or abort on the
   broken runtime).
"""

from __future__ import annotations

import atexit
import inspect
import math
import sys
import threading
import warnings

import jax

from ._watchdog import _KEY_PREFIX
from ._watchdog import RUNTIME_ERRORS
from ._watchdog import WorkerLostError
from ._watchdog import _Run
from ._watchdog import _say
from ._watchdog import exit_lost


_run: _Run | None = None


def _jax_keywords(**settings) -> dict:
  """``jax.distributed.initialize`` keywords for our settings, under the name
  this JAX version uses (``heartbeat_timeout_seconds`` in 0.4 to 0.11)."""
  names = {
      "heartbeat_timeout": ("heartbeat_timeout_seconds", "heartbeat_timeout"),
      "shutdown_timeout": ("shutdown_timeout_seconds", "shutdown_timeout"),
      "initialization_timeout": ("initialization_timeout",
                                 "initialization_timeout_seconds"),
  }
  accepted = inspect.signature(jax.distributed.initialize).parameters
  out = {}
  for setting, value in settings.items():
    name = next((n for n in names[setting] if n in accepted), None)
    if name is None:
      warnings.warn(f"jax.distributed.initialize takes no {setting} in JAX "
                    f"{jax.__version__}: left at JAX's default", stacklevel=3)
    else:
      out[name] = value
  return out


def _distributed_state():
  """``jax.distributed``'s global state, which holds the client (private:
  ``None`` if a JAX version moves it)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(distributed, "global_state", None)


def _check_seconds(name: str, value, minimum: float) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not value >= minimum or math.isinf(value)):
    raise ValueError(f"jadam.parallel.initialize({name}=...) must be a finite "
                     f"number of seconds >= {minimum:g}, got {value!r}")


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               *,
               heartbeat_timeout: float = 10,
               grace_period: float = 5,
               initialization_timeout: float = 300,
               shutdown_timeout: float = 300,
               local_device_ids=None,
               cpu_collectives: str | None = "gloo") -> None:
  """Joins a multi-process run that fails fast when a process dies.

  Call it instead of ``jax.distributed.initialize``, in every process, before
  anything else touches JAX. When a process dies (killed, crashed, its host
  lost), every other process gets a :class:`WorkerLostError` naming it, in
  the main thread, about ``heartbeat_timeout`` seconds later (at once for the
  coordinator, process 0), and ends with exit code
  :data:`WORKER_LOST_EXIT_CODE` at most ``grace_period`` seconds after that:

  >>> jadam.parallel.initialize("host0:1234", num_processes=4,
  ...                           process_id=i)  # doctest: +SKIP
  >>> try:  # doctest: +SKIP
  ...   train()
  ... except jadam.parallel.WorkerLostError as e:
  ...   save_local_state()  # within grace_period; no collectives any more
  ...   raise

  ``jadam.parallel.WorkerLostError: process 1 of 4 stopped responding (no
  heartbeat for 10 s, or disconnected)``. End the run with :func:`shutdown`
  (or let the interpreter exit), not ``jax.distributed.shutdown``: the
  processes then leave together.

  A loss is detected about ``heartbeat_timeout`` (10) seconds after it
  happens. JAX's client sends a heartbeat every ``heartbeat_timeout / 2``
  seconds, and a heartbeat that fails or waits longer than that aborts the
  process: on a busy or slow cluster, where a live process or the
  coordinator may stall for seconds (swapping, paused VMs, hosts with more
  busy threads than cores), raise ``heartbeat_timeout`` to 30 s or more
  (JAX's own default is 100 s); on a quiet one, 5 s detects twice as fast.

  Args:
    coordinator_address: ``host:port`` of process 0, which hosts JAX's
      coordination service; ``None`` lets JAX detect it (Slurm, Open MPI,
      TPU), as do ``num_processes`` and ``process_id``.
    num_processes: the number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    heartbeat_timeout: seconds without a heartbeat after which a process is
      lost (rounded up to whole seconds, at least 1).
    grace_period: seconds this process may spend handling
      :class:`WorkerLostError` (writing a local checkpoint, say) before it is
      ended; also how long a main thread blocked inside JAX is waited for.
    initialization_timeout: seconds to wait for every process to join.
    shutdown_timeout: seconds :func:`shutdown` waits for the other processes
      to reach it.
    local_device_ids: passed to ``jax.distributed.initialize``.
    cpu_collectives: the CPU backend's cross-process collectives (``"gloo"``;
      ``"mpi"``), or ``None`` to leave JAX's setting.

  Raises:
    ValueError: a timeout is not a finite number in its range.
    RuntimeError: from ``jax.distributed.initialize``: called twice, or after
      JAX's backends started.
  """
  global _run
  _check_seconds("heartbeat_timeout", heartbeat_timeout, 1)
  _check_seconds("grace_period", grace_period, 0)
  _check_seconds("initialization_timeout", initialization_timeout, 1)
  _check_seconds("shutdown_timeout", shutdown_timeout, 0)
  if _run is not None:
    raise RuntimeError("jadam.parallel.initialize was already called: call "
                       "jadam.parallel.shutdown() first")
  heartbeat_timeout = math.ceil(heartbeat_timeout)  # the runtime takes int s
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  try:
    # The service then records a dead process instead of aborting the others;
    # our watchdog reports it.
    jax.config.update("jax_enable_recoverability", True)
  except (AttributeError, KeyError, ValueError):  # a JAX without the option
    warnings.warn(f"JAX {jax.__version__} has no jax_enable_recoverability: a "
                  "lost process other than the coordinator aborts the others",
                  stacklevel=2)
  jax.distributed.initialize(
      coordinator_address, num_processes, process_id,
      local_device_ids=local_device_ids,
      **_jax_keywords(heartbeat_timeout=heartbeat_timeout,
                      shutdown_timeout=math.ceil(shutdown_timeout),
                      initialization_timeout=math.ceil(
                          initialization_timeout)))
  state = _distributed_state()
  client = getattr(state, "client", None)
  if client is None or not hasattr(client, "get_live_nodes"):
    warnings.warn(f"JAX {jax.__version__}'s distributed client offers no "
                  "get_live_nodes: jadam.parallel cannot watch the other "
                  "processes", stacklevel=2)
    return
  run = _Run(state, client,
             process_id=getattr(state, "process_id", process_id),
             num_processes=getattr(state, "num_processes", num_processes),
             coordinator=(getattr(state, "coordinator_address", None)
                          or coordinator_address),
             heartbeat_timeout=heartbeat_timeout, grace_period=grace_period,
             shutdown_timeout=shutdown_timeout)
  if run.num_processes < 2:
    return
  run.install_handlers()
  _run = run
  run.watchdog = threading.Thread(target=run.watch, daemon=True,
                                  name="jadam.parallel watchdog")
  run.watchdog.start()


def worker_lost() -> WorkerLostError | None:
  """The :class:`WorkerLostError` of this run if a process was lost, else
  ``None``."""
  return None if _run is None else _run.error


def explain(error: BaseException) -> None:
  """Raises :class:`WorkerLostError` (from ``error``) if a JAX runtime error
  in this fail-fast run was caused by a lost process.

  A collective whose peer died often fails at once (gloo: "Connection closed
  by peer"), before the service has noticed the missing heartbeats: waits up
  to one detection time for the watchdog's verdict. Returns when the error
  is not a runtime error, the run is not fail-fast, or no process was lost.
  """
  run = _run
  if run is None or not isinstance(error, RUNTIME_ERRORS):
    return
  run.await_verdict()  # the interrupt may land here: fine
  if run.error is not None:
    run.delivered = True
    raise run.error from error


def shutdown() -> None:
  """Leaves the run in step with the other processes.

  Waits (up to ``shutdown_timeout``) until every process has called it, then
  disconnects; process 0, which hosts the service, disconnects last. Called
  at interpreter exit if not called before. After a lost process it does
  nothing: the process ends with :data:`WORKER_LOST_EXIT_CODE`.
  """
  run = _run
  if run is None:
    jax.distributed.shutdown()
    return
  if run.error is not None:
    return
  try:
    run.client.key_value_set(f"{_KEY_PREFIX}/left/{run.process_id}", "1",
                             allow_overwrite=True)
    run.client.wait_at_barrier(f"{_KEY_PREFIX}/shutdown",
                               int(run.shutdown_timeout * 1000))
  except RUNTIME_ERRORS as e:
    if run.error is not None:
      return
    _say(f"jadam.parallel.shutdown: not every process reached shutdown in "
         f"{run.shutdown_timeout:g} s ({e}); leaving anyway\n")
  _leave(run, wait_for_others=True)


def _leave(run: _Run, wait_for_others: bool) -> None:
  """Stops watching and disconnects; with ``wait_for_others``, process 0
  disconnects (and stops the service) once the others have."""
  global _run
  run.draining = wait_for_others and run.process_id == 0
  run.stopping.set()
  if run.draining and run.watchdog is not None:
    run.watchdog.join(run.shutdown_timeout)
  if run.error is not None:
    return
  run.restore_handlers()
  _run = None
  jax.distributed.shutdown()
  if run.watchdog is not None:
    # A daemon thread still inside a JAX call when the interpreter finalizes
    # aborts the process when the call returns ("FATAL: exception not
    # rethrown"). get_live_nodes returns at the others' next poll or when
    # the service answers the disconnect.
    run.watchdog.join(run.heartbeat_timeout + 4 * run.poll_interval)


@atexit.register  # runs before JAX's own exit handler (registered earlier)
def _at_exit() -> None:
  run = _run
  if run is None:
    return
  if run.error is not None:
    exit_lost()
  last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
  if last is not None:
    # Dying of an uncaught exception: leave at once; the others see this
    # process stop responding. A JAX runtime error may be a collective that
    # failed on a lost peer before the watchdog named it: wait for that.
    if isinstance(last, RUNTIME_ERRORS):
      run.delivered = True  # say it below, not as an error inside atexit
      run.await_verdict()
      if run.error is not None:
        run.end()
    _leave(run, wait_for_others=False)
    return
  shutdown()
