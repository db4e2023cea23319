"""One process of a 2-process fail-fast run, for tests/test_faults_mp.py.

Joins with ``jadam.parallel.initialize`` on 2 fake CPU devices, then trains a
small regression with ``jadam.parallel.DataParallel`` step after step,
printing ``step <n>`` (flushed) after each, until ``--steps`` or until the
test kills one process. A :class:`jadam.parallel.WorkerLostError` is caught,
reported as ``handled: <message>`` on stdout (where a real run would save a
local checkpoint), and raised again. With ``--block-after N``, the main
thread waits after step N inside a JAX call that no exception can reach
(jadam.parallel then ends the process after its grace period). After
``--steps`` steps the process waits ``--linger`` seconds, leaves with
``jadam.parallel.shutdown()`` and prints ``done``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--coordinator", required=True, help="host:port")
  parser.add_argument("--steps", type=int, default=1_000_000)
  parser.add_argument("--heartbeat-timeout", type=float, default=5,
                      help="jadam.parallel.initialize's (10 by default)")
  parser.add_argument("--grace-period", type=float, default=5)
  parser.add_argument("--block-after", type=int, default=None,
                      help="after this step, wait in a JAX call that no "
                      "Python exception can interrupt")
  parser.add_argument("--linger", type=float, default=0,
                      help="seconds to wait after training, before shutdown")
  args = parser.parse_args(argv)

  # Before JAX starts: 2 CPU devices of this process's own.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top

  jadam.parallel.initialize(
      args.coordinator, args.num_processes, args.process_id,
      heartbeat_timeout=args.heartbeat_timeout,
      grace_period=args.grace_period, initialization_timeout=60)

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)

  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 8)).astype(np.float32),
            "v": rng.normal(size=(8, 1)).astype(np.float32)}
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  trainer = jadam.parallel.DataParallel(loss_fn, optax.adam(1e-2), mesh)
  params, opt_state = trainer.init(params)
  local = 8  # rows per process and step
  try:
    for step in range(args.steps):
      x = np.random.default_rng((step, args.process_id)).normal(
          size=(local, 3)).astype(np.float32)
      params, opt_state, loss = trainer.step(
          params, opt_state, (x, np.cos(x.sum(1, keepdims=True))))
      print(f"step {step} loss {float(loss):.4f}", flush=True)
      if step == args.block_after:
        print("blocked", flush=True)
        # A key nobody sets: the client waits in C++ without checking for
        # Python signals (unlike block_until_ready).
        from jax._src import distributed  # pylint: disable=g-import-not-at-top
        distributed.global_state.client.blocking_key_value_get(
            "jadam_tests/never", 600_000)
  except jadam.parallel.WorkerLostError as e:
    print(f"handled: {e}", flush=True)
    raise
  time.sleep(args.linger)  # alive, but in no collective: not lost
  jadam.parallel.shutdown()
  print("done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
