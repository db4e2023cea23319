"""One fresh process of tests/test_checkpoint.py: trains, saves, restores.

Modes:

* ``train``: train ``--steps`` steps with each strategy, saving a checkpoint
  after ``--save-at`` steps, and write the uninterrupted run's result.
* ``resume``: restore the latest checkpoint into a new trainer (never
  initialized) on ``--devices`` devices, train to ``--steps``, write the result.
* ``kill``: save step 1 of a large model and wait for it, then start saving
  step 2 and touch ``<dir>/saving-2`` so that the test can kill the process
  while the files are being written.

A result is ``<strategy>.npz`` in ``--out``: the gathered params and optimizer
state after the last step, and the losses after the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

import _mp_worker

STRATEGIES = {"zero1": 1, "zero2": 2}  # strategy -> accumulation steps


def optimizer():
  import jadam  # pylint: disable=g-import-not-at-top
  return jadam.adamw(1e-2, weight_decay=0.05,
                     mask=lambda p: {k: not k.startswith("b") for k in p})


def flatten(prefix, tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("mode", choices=("train", "resume", "kill"))
  parser.add_argument("--dir", required=True)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--save-at", type=int, default=10)
  parser.add_argument("--out")
  args = parser.parse_args(argv)

  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jadam.checkpoint  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top
  from test_parallel import init_params, make_batches, mse  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == args.devices
  mesh = jax.make_mesh((args.devices,), ("data",))

  if args.mode == "kill":
    return kill_during_save(pathlib.Path(args.dir), mesh)

  batches = make_batches(args.steps)
  for strategy, k in STRATEGIES.items():
    trainer = jadam.parallel.DataParallel(mse, optimizer(), mesh,
                                          strategy=strategy, accumulation_steps=k)
    ckpt = jadam.checkpoint.Checkpointer(os.path.join(args.dir, strategy),
                                         max_to_keep=2)
    if args.mode == "train":
      params, opt_state = trainer.init(init_params())
      start = 0
    else:
      start, params, opt_state = ckpt.restore(trainer)
      assert start == args.save_at, start
    losses = []
    for i in range(start, args.steps):
      params, opt_state, loss = trainer.step(params, opt_state, batches[i])
      if i + 1 == args.save_at and args.mode == "train":
        ckpt.save(i + 1, params, opt_state)  # asynchronous; the next step donates
      if i + 1 > args.save_at:
        losses.append(float(loss))
    ckpt.wait()
    params, opt_state = trainer.gather((params, opt_state))
    np.savez(os.path.join(args.out, f"{strategy}.npz"), losses=np.array(losses),
             **flatten("params", params), **flatten("state", opt_state))
    ckpt.close()
  return 0


def big_params(seed: int = 0) -> dict:
  """32 MiB of float32 params (96 MiB with Adam's moments)."""
  rng = np.random.default_rng(seed)
  return {"w1": rng.normal(size=(4, 2048 * 1024)).astype(np.float32),
          "b1": np.zeros((2048 * 1024,), np.float32)}


def big_loss(params, batch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h = batch["x"] @ params["w1"] + params["b1"]
  return jnp.mean(h ** 2)


def kill_during_save(directory: pathlib.Path, mesh) -> int:
  import jadam.checkpoint  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top

  trainer = jadam.parallel.DataParallel(big_loss, optimizer(), mesh,
                                        strategy="zero1")
  params, opt_state = trainer.init(big_params())
  ckpt = jadam.checkpoint.Checkpointer(directory / "ckpt")
  ckpt.save(1, params, opt_state)
  ckpt.wait()
  batch = {"x": np.ones((mesh.size, 4), np.float32)}
  params, opt_state, _ = trainer.step(params, opt_state, batch)
  ckpt.save(2, params, opt_state)
  (directory / "saving-2").touch()
  time.sleep(120)  # killed long before
  return 3


if __name__ == "__main__":
  _mp_worker.run_worker(main)
