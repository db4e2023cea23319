"""One fresh process of tests/test_checkpoint.py: trains, saves, restores.

Modes:

* ``train``: train ``--steps`` steps with each strategy, saving a checkpoint
  after ``--save-at`` steps, and write the uninterrupted run's result.
* ``resume``: restore the latest checkpoint into a new trainer (never
  initialized) on ``--devices`` devices, train to ``--steps``, write the result.
* ``kill``: save step 1 of a large model and wait for it, then start saving
  step 2 and touch ``<dir>/saving-2`` so that the test can kill the process
  while the files are being written.
* ``two-processes``: one of 2 ``jax.distributed`` processes (4 devices
  each): save steps 1 and 2 of a ZeRO-1 run (each process its own shards
  and checksums); process 0 then overwrites bytes inside a chunk written by
  process 1 in step 2; both restore. Writes ``saved1.npz`` (step 1 as saved)
  and ``restored-<process>.npz`` with the warnings in ``warnings-<process>``.

A result is ``<strategy>.npz`` in ``--out``: the gathered params and optimizer
state after the last step, and the losses after the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import urllib.parse
import warnings

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
  parser.add_argument("mode", choices=("train", "resume", "kill", "two-processes"))
  parser.add_argument("--dir", required=True)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--save-at", type=int, default=10)
  parser.add_argument("--out")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", help="host:port (two-processes)")
  args = parser.parse_args(argv)
  if args.mode == "two-processes":
    return two_processes(args)

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


def wide_params(hidden: int = 1024) -> dict:
  """test_parallel's model with ``hidden`` units: chunks of several KiB, so
  that orbax stores them in data files (smaller values sit in the index)."""
  rng = np.random.default_rng(0)
  return {"w1": rng.normal(0, 0.5, (4, hidden)).astype(np.float32),
          "b1": rng.normal(0, 0.1, (hidden,)).astype(np.float32),
          "w2": rng.normal(0, 0.5, (hidden, 1)).astype(np.float32),
          "b2": np.zeros((1,), np.float32)}


def chunk_location(item_dir, key: str) -> tuple[str, int, int]:
  """``(file, offset, length)`` of an orbax array chunk (``"0.mu.float32/3"``)
  stored out of line in an item's OCDBT database (read with tensorstore's
  own dump of the index)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kv = ts.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
  manifest = ts.ocdbt.dump(kv).result()
  node = ts.ocdbt.dump(kv, manifest["versions"][-1]["root"]["location"]).result()
  assert node["height"] == 0, "expected a one-node index"
  for entry in node["entries"]:
    if entry["key"] == key.encode():
      _, base, relative, offset, length = entry["indirect_value"].rsplit(":", 4)
      path = urllib.parse.unquote(base) + urllib.parse.unquote(relative)
      return os.path.join(item_dir, path), int(offset), int(length)
  raise KeyError(key)


def overwrite(file, offset: int, data: bytes = b"\x5a" * 16) -> None:
  with open(file, "r+b") as f:
    f.seek(offset)
    f.write(data)


def two_processes(args) -> int:
  import _mp_worker as mpw  # pylint: disable=g-import-not-at-top
  args.num_processes, args.local_devices, args.timeout = 2, 4, 30
  jax = mpw.join_run(args)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import jadam.checkpoint  # pylint: disable=g-import-not-at-top
  import jadam.parallel  # pylint: disable=g-import-not-at-top
  from test_parallel import make_batches, mse  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ("data",))
  out = pathlib.Path(args.out)
  make = lambda: jadam.parallel.DataParallel(mse, optimizer(), mesh, strategy="zero1")
  trainer = make()
  params, opt_state = trainer.init(wide_params())
  ckpt = jadam.checkpoint.Checkpointer(args.dir)
  ckpt.save(1, params, opt_state)
  ckpt.wait()
  saved = trainer.gather((params, opt_state))  # a collective: both processes
  if args.process_id == 0:
    np.savez(out / "saved1.npz", **flatten("params", saved[0]),
             **flatten("state", saved[1]))
  batch = make_batches(1, size=16)[0]
  rows = slice(8 * args.process_id, 8 * args.process_id + 8)
  params, opt_state, _ = trainer.step(
      params, opt_state, {k: v[rows] for k, v in batch.items()})
  ckpt.save(2, params, opt_state)
  ckpt.wait()
  multihost_utils.sync_global_devices("saved")
  if args.process_id == 0:
    # Chunk 5 of mu: the 6th device's slice, on process 1.
    file, offset, length = chunk_location(
        os.path.join(args.dir, "2", "opt_state"), "0.mu.float32/5")
    assert "ocdbt.process_1" in file, file
    overwrite(file, offset + length // 2)
  multihost_utils.sync_global_devices("damaged")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step, params, opt_state = ckpt.restore(make())
  assert step == 1, step
  (out / f"warnings-{args.process_id}").write_text(
      "\n".join(str(w.message) for w in caught))
  restored = trainer.gather((params, opt_state))
  np.savez(out / f"restored-{args.process_id}.npz",
           **flatten("params", restored[0]), **flatten("state", restored[1]))
  ckpt.close()
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  _mp_worker.run_worker(main)
