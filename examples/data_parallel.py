"""Data-parallel training of a small MLP classifier with jadam.parallel.

The batch is split over every device (of every process); each step averages
the gradients over the devices and applies one AdamW update everywhere.

  # 8 fake CPU devices in one process:
  python examples/data_parallel.py --fake-devices 8 --strategy shard_map
  # 2 local processes with 4 fake CPU devices each (jax.distributed, gloo):
  python examples/data_parallel.py --num-processes 2 --fake-devices 4
  # one process per host of a cluster (run on every host, i = 0 .. N-1):
  python examples/data_parallel.py --coordinator HOST0:1234 \\
      --num-processes N --process-id i

Several processes join with jadam.parallel.initialize: if one dies, the
others raise jadam.parallel.WorkerLostError naming it within seconds and exit
with code jadam.parallel.WORKER_LOST_EXIT_CODE (75), instead of hanging until
JAX's runtime aborts them.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import traceback


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--strategy", default="shard_map",
                      choices=("shard_map", "jit", "pmap"))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=256,
                      help="global batch size (over all processes)")
  parser.add_argument("--accumulation-steps", type=int, default=1)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--fake-devices", type=int, default=None,
                      help="run on this many fake CPU devices per process")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=None,
                      help="this process's index; without it and with "
                      "--num-processes > 1, launch the processes locally")
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0's coordinator")
  parser.add_argument("--heartbeat-timeout", type=float, default=10,
                      help="seconds of silence after which a process is "
                      "lost (raise it on a slow or busy cluster)")
  return parser.parse_args(argv)


def launch_local(args: argparse.Namespace, argv: list[str]) -> int:
  """Starts ``--num-processes`` copies of this program on this machine and
  waits; if one fails, ends the others and returns its exit code (the
  others would stop by themselves: a lost process makes them raise
  ``WorkerLostError``)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # a local run is a CPU demo
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, *argv, "--process-id", str(i),
           "--coordinator", coordinator], env=env)
      for i in range(args.num_processes)]
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f"process {i} failed with exit code {code}; ending the rest",
              file=sys.stderr)
        return code
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def train(args: argparse.Namespace) -> None:
  if args.fake_devices:
    # Before JAX starts: XLA reads this flag once, when the CPU backend starts.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.fake_devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import tqdm

  import jadam.parallel

  if args.num_processes > 1:
    # jax.distributed.initialize with gloo CPU collectives, a short heartbeat
    # and a watchdog: a lost process raises WorkerLostError here.
    jadam.parallel.initialize(
        args.coordinator, args.num_processes, args.process_id,
        heartbeat_timeout=args.heartbeat_timeout)
  me = jax.process_index()

  def loss_fn(params, batch):
    x, labels = batch
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return jnp.mean(loss), {"accuracy": accuracy}

  # The same initial params in every process.
  features, hidden, classes = 16, 64, 4
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(features, classes))
  params = {
      "w1": rng.normal(0, features**-0.5, (features, hidden)),
      "b1": np.zeros(hidden),
      "w2": rng.normal(0, hidden**-0.5, (hidden, classes)),
      "b2": np.zeros(classes),
  }
  params = {k: v.astype(np.float32) for k, v in params.items()}

  def local_batch(step):
    """This process's rows of the step's global batch. Every process draws
    the same global batch, so any number of processes and devices trains on
    the same data (a real loader would read only its own rows)."""
    local = args.batch_size // jax.process_count()
    x = np.random.default_rng((1, step)).normal(
        size=(args.batch_size, features)).astype(np.float32)
    x = x[me * local:(me + 1) * local]
    return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  trainer = jadam.parallel.DataParallel(
      loss_fn, optax.adamw(args.learning_rate), mesh, strategy=args.strategy,
      has_aux=True, accumulation_steps=args.accumulation_steps)
  params, opt_state = trainer.init(params)
  if me == 0:
    print(f"{args.strategy}: {jax.process_count()} processes, "
          f"{jax.device_count()} devices, global batch {args.batch_size}",
          flush=True)

  first = None
  bar = tqdm.trange(args.steps, disable=me != 0, desc="train")
  for step in bar:
    params, opt_state, (loss, aux) = trainer.step(
        params, opt_state, local_batch(step))
    if first is None:
      first = float(loss)
    if step % 10 == 0 or step == args.steps - 1:
      bar.set_postfix(loss=f"{float(loss):.4f}",
                      accuracy=f"{float(aux['accuracy']):.3f}")
  final = float(loss)
  trained = trainer.gather(params)  # host numpy, the same in every process
  if me == 0:
    print(f"first loss {first:.4f}, final loss {final:.4f}, "
          f"accuracy {float(aux['accuracy']):.3f}, "
          f"|w1| {np.linalg.norm(trained['w1']):.3f}", flush=True)
  if args.num_processes > 1:
    jadam.parallel.shutdown()  # leaves once every process is done


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.num_processes > 1 and args.process_id is None:
    return launch_local(args, sys.argv[1:] if argv is None else argv)
  try:
    train(args)
  except BaseException as e:
    if args.num_processes == 1:
      raise
    # Fail fast: a normal exit would wait at the shutdown barrier for the
    # other processes, which are waiting on this one. (A real run would save
    # what it can here: no collectives after a WorkerLostError.)
    traceback.print_exc()
    sys.stderr.flush()
    parallel = sys.modules.get("jadam.parallel")  # imported by train()
    lost = parallel and isinstance(e, parallel.WorkerLostError)
    os._exit(parallel.WORKER_LOST_EXIT_CODE if lost else 1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
