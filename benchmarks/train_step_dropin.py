"""The optax drop-in inside a whole train step: a 4-layer tanh MLP with
2048x2048 weights (16.8M float32 params), batch 8, the gradient computed in
the same jit, params and state donated; ``jadam.adam`` with float32 or q8
moments, on XLA's ops (``kernel="xla"``) and on the fused kernel
(``kernel="fused"``).

    python benchmarks/train_step_dropin.py

Here the gradient is a temporary of the step, so the kernel writes the update
over it (see ``jadam/_kernel/_ffi.py``). In ``python -m jadam.bench`` the
gradient is an argument of the step: XLA copies it first. Each form runs in
a fresh process; median of 30 steps.
"""

from __future__ import annotations

import json
import sys

from _timing import carried_ms, in_fresh_process


def run_one(moments: str, kernel: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jadam  # pylint: disable=import-outside-toplevel

  d = 2048
  keys = jax.random.split(jax.random.key(0), 4)
  params = {f"w{i}": jax.random.normal(k, (d, d)) * 0.02 for i, k in enumerate(keys)}
  x = jax.random.normal(jax.random.key(1), (8, d))
  fmt = None if moments == "float32" else moments
  tx = jadam.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt, kernel=kernel)

  def loss(p):
    h = x
    for i in range(4):
      h = jnp.tanh(h @ p[f"w{i}"])
    return jnp.mean(h ** 2)

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  f = jax.jit(step, donate_argnums=(0, 1))
  return dict(moments=moments, kernel=kernel,
              **carried_ms(f, params, tx.init(params), steps=30))


def main():
  if len(sys.argv) == 3:
    print(json.dumps(run_one(*sys.argv[1:])))
    return
  for moments in ("float32", "q8"):
    for kernel in ("xla", "fused"):
      r = in_fresh_process(__file__, moments, kernel)
      print(f"{r['moments']} moments, kernel={r['kernel']}: {r['median_ms']:.2f} ms "
            f"(IQR {r['iqr_ms']:.2f})", flush=True)


if __name__ == "__main__":
  main()
