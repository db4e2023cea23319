"""Case (c) of ``python -m jadam.bench`` (2000 leaves of 1000 float32 params):
how much of a tree-in/tree-out step is JAX's dispatch of its arrays, and
where the compile time goes.

    python benchmarks/many_leaves_floor.py

Prints, per form, the median of 20 donated calls and the seconds spent
tracing, lowering and compiling: a jitted identity over params, moments and
gradients (no arithmetic), a donated ``p + g`` over them, ``optax.adam`` with
``optax.apply_updates``, and ``jadam.step`` (on CPU its default is the fused
kernel).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

N_LEAVES, SIZE, CALLS = 2000, 1000, 20


def tree(seed: float):
  return {f"p{i:04d}": jnp.full((SIZE,), seed * (i + 1), jnp.float32) for i in range(N_LEAVES)}


def measure(name, fn, args, donate):
  jitted = jax.jit(fn, donate_argnums=donate)
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  args = list(args)
  times = []
  for i in range(CALLS + 3):
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    if i >= 3:
      times.append(time.perf_counter() - start)
    for j, k in enumerate(donate):
      args[k] = out[j]
  print(f"{name:34s} step {1e3 * np.median(times):7.2f} ms   trace {t1 - t0:5.2f} s  "
        f"lower {t2 - t1:5.2f} s  compile {t3 - t2:6.2f} s", flush=True)


def main():
  print(f"{N_LEAVES} leaves x {SIZE} float32, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}")
  g = tree(1e-3)
  measure("identity (no arithmetic)", lambda p, m, v, g: (p, m, v),
          (tree(0.01), tree(0.0), tree(0.0), g), donate=())
  measure("donated p + g", lambda p, m, v, g: (jax.tree.map(jnp.add, p, g), m, v),
          (tree(0.01), tree(0.0), tree(0.0), g), donate=(0, 1, 2))
  tx = optax.adam(1e-3)

  def optax_step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = tree(0.01)
  measure("optax.adam + apply_updates", optax_step, (p, tx.init(p), g), donate=(0, 1))
  for kernel in ("auto", "xla"):
    p = tree(0.01)
    measure(f"jadam.step(kernel={kernel!r})",
            lambda p, s, g, k=kernel: jadam.step(g, s, p, learning_rate=1e-3, kernel=k),
            (p, jadam.init(p), g), donate=(0, 1))


if __name__ == "__main__":
  main()
