"""Case (c) of ``python -m jadam.bench`` (2000 leaves of 1000 float32 params):
how much of a tree-in/tree-out step is JAX's dispatch of its arrays, and
where the compile time goes.

    python benchmarks/many_leaves_floor.py [SIZE]

(SIZE: elements per leaf, default 1000; with 1 the arithmetic is nothing and
what is left is the dispatch.)

Prints, per form, the median of 20 donated calls and the seconds spent
tracing, lowering and compiling: a jitted identity over params, moments and
gradients (no arithmetic), a donated ``p + g`` over them, ``optax.adam`` with
``optax.apply_updates``, and ``jadam.step`` (on CPU its default is the fused
kernel). Then optax and jadam again, 20 steps inside one jitted
``fori_loop``: the time per step without the per-array dispatch, as when
the update is part of a jitted training step.
"""

from __future__ import annotations

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

N_LEAVES, CALLS = 2000, 20
SIZE = int(sys.argv[1]) if len(sys.argv) > 1 else 1000


def tree(seed: float):
  return {f"p{i:04d}": jnp.full((SIZE,), seed * (i + 1), jnp.float32) for i in range(N_LEAVES)}


def measure(name, fn, args, donate):
  jitted = jax.jit(fn, donate_argnums=donate)
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  # Timed through the jitted function (its C++ dispatch path; calling the
  # AOT-compiled object goes through Python per leaf, which is slower).
  args = list(args)
  times = []
  for i in range(CALLS + 3):
    start = time.perf_counter()
    out = jitted(*args)
    jax.block_until_ready(out)
    if i >= 3:
      times.append(time.perf_counter() - start)
    for j, k in enumerate(donate):
      args[k] = out[j]
  print(f"{name:34s} step {1e3 * np.median(times):7.2f} ms   trace {t1 - t0:5.2f} s  "
        f"lower {t2 - t1:5.2f} s  compile {t3 - t2:6.2f} s", flush=True)


def measure_loop(name, one_step, args, steps=20):
  """``steps`` steps inside one jitted ``fori_loop`` (gradients an argument):
  the update's own cost per step, without JAX's per-array dispatch (as inside
  a jitted training step)."""
  def many(p, s, g):
    return jax.lax.fori_loop(0, steps, lambda _, c: one_step(c[0], c[1], g), (p, s))
  jitted = jax.jit(many, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  args, times = list(args), []
  for i in range(8):
    start = time.perf_counter()
    args[0], args[1] = jitted(*args)
    jax.block_until_ready(args[0])
    if i >= 2:
      times.append(time.perf_counter() - start)
  print(f"{name + ' in a loop':34s} step {1e3 * np.median(times) / steps:7.2f} ms   "
        f"(trace + lower + compile of the {steps}-step loop {compile_s:6.2f} s)", flush=True)


def run(form: str):
  g = tree(1e-3)
  if form == "identity":
    measure("identity (no arithmetic)", lambda p, m, v, g: (p, m, v),
            (tree(0.01), tree(0.0), tree(0.0), g), donate=())
  elif form == "add":
    measure("donated p + g", lambda p, m, v, g: (jax.tree.map(jnp.add, p, g), m, v),
            (tree(0.01), tree(0.0), tree(0.0), g), donate=(0, 1, 2))
  elif form.startswith("optax"):
    tx = optax.adam(1e-3)

    def optax_step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p = tree(0.01)
    if form.endswith(":loop"):
      measure_loop("optax.adam + apply_updates", optax_step, (p, tx.init(p), g))
    else:
      measure("optax.adam + apply_updates", optax_step, (p, tx.init(p), g), donate=(0, 1))
  else:
    kernel = form.split(":")[1]
    p = tree(0.01)

    def jadam_step(p, s, g):
      return jadam.step(g, s, p, learning_rate=1e-3, kernel=kernel)

    if form.endswith(":loop"):
      measure_loop(f"jadam.step(kernel={kernel!r})", jadam_step, (p, jadam.init(p), g))
    else:
      measure(f"jadam.step(kernel={kernel!r})", jadam_step, (p, jadam.init(p), g),
              donate=(0, 1))


FORMS = ("identity", "add", "optax", "jadam:auto", "jadam:xla", "optax:loop",
         "jadam:auto:loop", "jadam:xla:loop")


def main():
  """Each form in a fresh process: in one process, later forms pay for the
  earlier ones' objects (the same step measured 24 ms first, 35 ms last)."""
  print(f"{N_LEAVES} leaves x {SIZE} float32, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}", flush=True)
  for form in FORMS:
    subprocess.run([sys.executable, __file__, str(SIZE), form], check=True)


if __name__ == "__main__":
  if len(sys.argv) > 2:
    run(sys.argv[2])
  else:
    main()
