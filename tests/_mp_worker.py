"""One process of a multi-process ``jax.distributed`` run on CPU, for
tests/test_multiprocess.py.

Run as a script, it joins the run, trains with ``jadam.parallel.DataParallel``
for every strategy asked, feeding its own share of each global batch, and
writes ``<strategy>-<process id>.npz`` (params, ``mu``, ``nu``, losses) into
``--out``. Imported, it only gives the problem (numpy) that both this worker
and the test's single-device reference use: nothing here touches JAX at import.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np

STEPS = 20
GLOBAL_BATCH = 32  # 8 devices x 2 micro-batches x 2 rows
ACCUMULATION_STEPS = 2
LEARNING_RATE = 1e-2
ONEBIT_WARMUP = 8  # "onebit": OneBit(warmup_steps=8) with jadam.adam


SKIP_STEP = 10  # "<strategy>+skip": this step's batch holds a NaN


def optimizer_and_strategy(strategy: str):
  """The trainer's optimizer and ``strategy=`` for a strategy named on the
  command line (1-bit Adam needs a jadam optimizer and a warm-up shorter
  than the run; ``<strategy>+skip``, jadam.adam with skip_nonfinite)."""
  import optax  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top
  if strategy == "onebit":
    return jadam.adam(LEARNING_RATE), jadam.parallel.OneBit(ONEBIT_WARMUP)
  if strategy.endswith("+skip"):
    return jadam.adam(LEARNING_RATE, skip_nonfinite=True), strategy[:-len("+skip")]
  return optax.adam(LEARNING_RATE), strategy


def problem_for(strategy: str):
  """:func:`make_problem`; for ``<strategy>+skip``, one NaN target (in the
  second process's rows) in the batch of step ``SKIP_STEP``."""
  params, batches = make_problem()
  if strategy.endswith("+skip"):
    x, y = batches[SKIP_STEP - 1]
    y = y.copy()
    y[GLOBAL_BATCH - 3, 0] = np.nan
    batches[SKIP_STEP - 1] = (x, y)
  return params, batches


def make_problem(steps: int = STEPS, batch: int = GLOBAL_BATCH):
  """Initial params and ``steps`` global batches, the same in every process."""
  rng = np.random.default_rng(0)
  params = {
      "w1": rng.normal(0, 0.5, (3, 8)).astype(np.float32),
      "b1": np.zeros((8,), np.float32),
      "w2": rng.normal(0, 0.5, (8, 1)).astype(np.float32),
  }
  batches = []
  for _ in range(steps):
    x = rng.normal(size=(batch, 3)).astype(np.float32)
    y = np.cos(x.sum(axis=1, keepdims=True)).astype(np.float32)
    batches.append((x, y))
  return params, batches


def loss_fn(params, batch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x, y = batch
  pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  return jnp.mean((pred - y) ** 2)


def flatten(prefix: str, tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def join_run(args: argparse.Namespace):
  """Starts JAX on this process's own CPU devices and joins the run.

  Returns the ``jax`` module, imported only now: the device count and
  platform must be set before JAX starts (nothing inherited from the parent).
  """
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  # Cross-process CPU collectives (the default in JAX 0.10; said explicitly).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=args.timeout)
  assert jax.process_count() == args.num_processes
  assert jax.local_device_count() == args.local_devices
  return jax


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--coordinator", required=True, help="host:port")
  parser.add_argument("--local-devices", type=int, default=4)
  parser.add_argument("--strategies", nargs="+", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--timeout", type=int, default=30,
                      help="seconds to wait for the other processes to join")
  parser.add_argument("--fail", action="store_true",
                      help="raise after joining (tests the harness)")
  args = parser.parse_args(argv)

  jax = join_run(args)
  if args.fail:
    raise RuntimeError(f"injected failure in process {args.process_id}")

  import optax  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top

  share = GLOBAL_BATCH // args.num_processes
  rows = slice(args.process_id * share, (args.process_id + 1) * share)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  for strategy in args.strategies:
    params0, batches = problem_for(strategy)
    optimizer, options = optimizer_and_strategy(strategy)
    trainer = jadam.parallel.DataParallel(
        loss_fn, optimizer, mesh, strategy=options,
        accumulation_steps=ACCUMULATION_STEPS)
    params, opt_state = trainer.init(params0)
    losses = []
    for x, y in batches:
      # Process i feeds rows [i * B / P, (i + 1) * B / P) of the global batch.
      params, opt_state, loss = trainer.step(
          params, opt_state, (x[rows], y[rows]))
      losses.append(float(loss))
    try:  # checked before anything runs: nothing is donated
      trainer.step(params, opt_state, (x[:3], y[:3]))
    except ValueError as e:
      assert "got a batch of 6 (this process's share is 3 rows" in str(e), e
    else:
      raise AssertionError("a batch that does not divide was accepted")
    params, opt_state = trainer.gather((params, opt_state))
    np.savez(
        os.path.join(args.out, f"{strategy}-{args.process_id}.npz"),
        losses=np.array(losses),
        **flatten("params", params),
        **flatten("mu", optax.tree.get(opt_state, "mu")),
        **flatten("nu", optax.tree.get(opt_state, "nu")))
  jax.distributed.shutdown()
  return 0


def run_worker(main_fn) -> None:
  """Runs a worker's ``main``; on an exception prints it and exits at once.

  Fail fast: a normal exit would wait at jax.distributed's shutdown barrier
  for processes that are themselves waiting on this one.
  """
  try:
    sys.exit(main_fn())
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  run_worker(main)
