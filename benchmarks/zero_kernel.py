"""ZeRO's slice update on XLA's ops and on the fused kernel: ``DataParallel``
with ``strategy="zero1"`` or ``"zero2"`` on 2 fake CPU devices, ``jadam.adam``
(float32 moments) on four 1024x2048 float32 leaves (8.4M params), a loss
whose backward pass is one multiply.

    python benchmarks/zero_kernel.py

Each form in a fresh process; median of 20 steps. Fake devices share this
machine's cores, so this compares the two paths, not a real cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def run_one(strategy: str, kernel: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jadam  # pylint: disable=import-outside-toplevel
  import jadam.parallel  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.normal(size=(1024, 2048)) * 0.02, jnp.float32)
            for i in range(4)}

  def loss(p, b):
    return sum(jnp.sum(v * b[0, 0]) for v in p.values()) / 1e6

  mesh = jax.make_mesh((2,), ("data",))
  trainer = jadam.parallel.DataParallel(loss, jadam.adam(1e-3, kernel=kernel), mesh,
                                        strategy=strategy)
  p, s = trainer.init(params)
  batch = jnp.ones((2, 4))
  for _ in range(3):
    p, s, _ = trainer.step(p, s, batch)
  jax.block_until_ready(p)
  times = []
  for _ in range(20):
    t = time.perf_counter()
    p, s, _ = trainer.step(p, s, batch)
    jax.block_until_ready(p)
    times.append(time.perf_counter() - t)
  print(f"{strategy}, kernel={kernel}: {1e3 * float(np.median(times)):.2f} ms", flush=True)


def main():
  if len(sys.argv) == 3:
    run_one(*sys.argv[1:])
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  for strategy in ("zero1", "zero2"):
    for kernel in ("xla", "fused"):
      subprocess.run([sys.executable, __file__, strategy, kernel], env=env, check=True)


if __name__ == "__main__":
  main()
