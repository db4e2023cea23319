"""What ``skip_nonfinite=True`` costs ``jadam.step`` on the packed flat
buffers of cases (a) and (b) of ``python -m jadam.bench``, on the fused kernel
and on XLA's ops.

    python benchmarks/skip_cost.py

Median of 30 donated steps each.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jadam
from jadam.bench import _runners


def median_ms(step, p, s, g, calls=30):
  for _ in range(3):
    p, s = step(p, s, g)
  jax.block_until_ready(p)
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    p, s = step(p, s, g)
    jax.block_until_ready(p)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  cases = _runners.make_cases(False, "cpu")
  device = jax.devices()[0]
  for case in ("a", "b"):
    shapes = cases[case].shapes
    params = _runners._random_tree(shapes, 0, 0.02, device)  # pylint: disable=protected-access
    grads = _runners._random_tree(shapes, 1, 1e-3, device)  # pylint: disable=protected-access
    layout = jadam.FlatLayout.from_tree(params)
    packed, packed_grads = jax.jit(layout.pack)(params), jax.jit(layout.pack)(grads)
    for kernel in ("xla", "fused"):
      ms = []
      for skip in (False, True):
        step = jax.jit(lambda p, s, g, k=kernel, sk=skip: jadam.step(
            g, s, p, kernel=k, skip_nonfinite=sk), donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, packed)
        ms.append(median_ms(step, p, jadam.init(p), packed_grads))
      print(f"case ({case}) jadam.step(kernel={kernel!r}) on packed buffers: {ms[0]:.2f} ms; "
            f"skip_nonfinite=True {ms[1]:.2f} ms ({100 * (ms[1] / ms[0] - 1):+.0f}%)", flush=True)


if __name__ == "__main__":
  main()
