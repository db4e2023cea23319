"""One process of a 2-process ``jax.distributed`` run of the ZeRO strategies on
CPU, for tests/test_zero.py.

It joins the run, trains ``tests/_mp_worker.py``'s problem with
``jadam.adam`` and ``DataParallel(strategy=...)`` for every strategy asked
(``zero1:q8``: with 8-bit moments),
feeding its own half of each global batch, and writes
``<strategy>-<process id>.npz`` (params, ``mu``, ``nu``, losses, all gathered)
into ``--out``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import _mp_worker


def moments(jadam, fmt: str) -> dict:
  """The optimizer's moment formats for a ``strategy:fmt`` name."""
  if not fmt:
    return {}
  q = jadam.Quantized(bits=int(fmt[1:]), block_size=16, min_quantized_size=0)
  return {"mu_dtype": q, "nu_dtype": q}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--coordinator", required=True, help="host:port")
  parser.add_argument("--local-devices", type=int, default=4)
  parser.add_argument("--strategies", nargs="+", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--timeout", type=int, default=30)
  args = parser.parse_args(argv)

  jax = _mp_worker.join_run(args)

  import jadam  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top

  params0, batches = _mp_worker.make_problem()
  share = _mp_worker.GLOBAL_BATCH // args.num_processes
  rows = slice(args.process_id * share, (args.process_id + 1) * share)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  for name in args.strategies:
    # "zero1:q8": 8-bit moments, quantized even for this small problem.
    strategy, _, fmt = name.partition(":")
    trainer = jadam.parallel.DataParallel(
        _mp_worker.loss_fn, jadam.adam(_mp_worker.LEARNING_RATE, **moments(jadam, fmt)), mesh,
        strategy=strategy, accumulation_steps=_mp_worker.ACCUMULATION_STEPS)
    params, opt_state = trainer.init(params0)
    # The state spans both processes: each holds the slices of its devices.
    (mu,) = opt_state[0].mu.values()
    if fmt:
      assert isinstance(mu, jadam.QArray)
      mu = mu.codes
    assert not mu.is_fully_addressable
    assert len(mu.addressable_shards) == args.local_devices
    losses = []
    for x, y in batches:
      params, opt_state, loss = trainer.step(params, opt_state, (x[rows], y[rows]))
      losses.append(float(loss))
    params, opt_state = trainer.gather((params, opt_state))
    np.savez(
        os.path.join(args.out, f"{name}-{args.process_id}.npz"),
        losses=np.array(losses),
        **_mp_worker.flatten("params", params),
        **_mp_worker.flatten("mu", opt_state[0].mu),
        **_mp_worker.flatten("nu", opt_state[0].nu))
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  _mp_worker.run_worker(main)
