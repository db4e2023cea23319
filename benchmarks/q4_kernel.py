"""What the fused kernel does for q4 moments (``mu`` block-wise 4-bit, ``nu``
rank-1 4-bit) on one 4096x4096 float32 matrix (16.8M params, case (a)'s
size as a tensor): the optax drop-in (update, then ``optax.apply_updates``)
and ``jadam.step``, each on XLA's ops and on the kernel, gradients passed in,
params and state donated.

    python benchmarks/q4_kernel.py

Each form in a fresh process; median of 20 steps, compile time.
"""

from __future__ import annotations

import json
import sys
import time

from _timing import carried_ms, in_fresh_process


def run_one(api: str, kernel: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jadam  # pylint: disable=import-outside-toplevel

  params = {"w": jax.random.normal(jax.random.key(0), (4096, 4096)) * 0.02}
  grads = {"w": jax.random.normal(jax.random.key(1), (4096, 4096)) * 1e-3}
  tx = jadam.adam(1e-3, mu_dtype="q4", nu_dtype="q4", kernel=kernel)

  def step(p, s, g):
    if api == "step":
      return jadam.step(g, s, p, learning_rate=1e-3, kernel=kernel)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = (jadam.init(params, mu_dtype="q4", nu_dtype="q4") if api == "step"
           else tx.init(params))
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  compile_s = time.perf_counter() - start
  return dict(api=api, kernel=kernel, **carried_ms(compiled, params, state, grads, steps=20),
              calls=compiled.as_text().count("custom-call("), compile_s=compile_s)


def main():
  if len(sys.argv) == 3:
    print(json.dumps(run_one(*sys.argv[1:])))
    return
  for api in ("dropin", "step"):
    for kernel in ("xla", "fused"):
      r = in_fresh_process(__file__, api, kernel)
      print(f"q4 {r['api']}, kernel={r['kernel']}: {r['median_ms']:.2f} ms, "
            f"compile {r['compile_s']:.2f} s, {r['calls']} custom call(s)", flush=True)


if __name__ == "__main__":
  main()
