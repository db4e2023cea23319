"""What the fused kernel does for master weights on bfloat16 params, with the
kernel (``kernel="fused"``) and with XLA's ops (``kernel="xla"``), on the
params of cases (a) and (b) of ``python -m jadam.bench``, in two forms:

* ``dropin``: ``jadam.adamw(..., master_weights=...)``'s update, then
  ``optax.apply_updates`` (the kernel writes the float32 update, XLA adds it);
* ``step``: ``jadam.step`` on a state from ``jadam.init(...,
  master_weights=...)`` (params, moments and master state in place), with
  the same weight decay.

    python benchmarks/master_kernel.py [--cases a,b] [--forms name,...] [--apis dropin,step]

Each form runs in a fresh process (one at a time: this machine has two cores).
Prints the median of 30 donated steps, the compile time (trace, lower and
compile) and the step's peak memory from XLA's memory analysis.
"""

from __future__ import annotations

import argparse
import json
import time

from _timing import carried_ms, in_fresh_process

FORMS = {  # name: (moments, master weights)
    "f32_moments": (None, None),
    "f32_moments+master_f32": (None, "float32"),
    "f32_moments+master_q8": (None, "q8"),
    "q8_moments+master_q8": ("q8", "q8"),
}


def run_one(case: str, form: str, api: str, kernel: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jadam  # pylint: disable=import-outside-toplevel
  from jadam.bench import _runners  # pylint: disable=import-outside-toplevel

  shapes = _runners.make_cases(False, "cpu")[case].shapes
  device = jax.devices()[0]
  # pylint: disable=protected-access
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        _runners._random_tree(shapes, 0, 0.02, device))
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                       _runners._random_tree(shapes, 1, 1e-3, device))
  moments, master = FORMS[form]
  moment_dtype = moments or jnp.float32
  tx = jadam.adamw(1e-3, weight_decay=1e-4, mu_dtype=moment_dtype, nu_dtype=moment_dtype,
                   master_weights=master, kernel=kernel)

  def step(p, s, g):
    if api == "step":
      return jadam.step(g, s, p, learning_rate=1e-3, weight_decay=1e-4, kernel=kernel)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  if api == "step":
    state = jadam.init(params, mu_dtype=moment_dtype, nu_dtype=moment_dtype,
                       master_weights=master)
  else:
    state = tx.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  compile_s = time.perf_counter() - start
  calls = compiled.as_text().count("custom-call(")
  mem = compiled.memory_analysis()
  peak = getattr(mem, "peak_memory_in_bytes", None) if mem is not None else None
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  timed = carried_ms(compiled, params, state, grads, steps=30)
  return dict(case=case, form=form, api=api, kernel=kernel, n_params=n, custom_calls=calls,
              **timed, compile_s=compile_s, peak_mb=None if peak is None else peak / 2**20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="a,b")
  parser.add_argument("--forms", default=",".join(FORMS))
  parser.add_argument("--apis", default="dropin,step")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # case:form:api:kernel, in a child
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(*args.one.split(":"))))
    return
  for case in args.cases.split(","):
    for form in args.forms.split(","):
      for api in args.apis.split(","):
        for kernel in ("xla", "fused"):
          r = in_fresh_process(__file__, "--one", f"{case}:{form}:{api}:{kernel}")
          print(f"case ({r['case']}) {r['n_params'] / 1e6:.1f}M bf16 params, {r['form']}, "
                f"{r['api']}, kernel={r['kernel']}: {r['median_ms']:.2f} ms "
                f"(IQR {r['iqr_ms']:.2f}), "
                f"compile {r['compile_s']:.2f} s, peak {r['peak_mb']:.0f} MB, "
                f"{r['custom_calls']} custom call(s)", flush=True)


if __name__ == "__main__":
  main()
