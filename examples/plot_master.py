"""A teacher-student regression in bfloat16, with and without master weights.

A two-layer student fits a fixed random teacher with ``jadam.adam`` (lr 3e-4,
float32 moments): with float32 params; with bfloat16 params and no master
weights (updates below a param's last place are rounded away); and with
bfloat16 params and ``master_weights="float32"`` or ``"q8"``. Plots the
training loss of each and prints the final losses as a Markdown table.

  python examples/plot_master.py --out docs/master_weights.png
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

RUNS = (("float32 params", jnp.float32, None),
        ("bfloat16, no master weights", jnp.bfloat16, None),
        ("bfloat16, master float32", jnp.bfloat16, "float32"),
        ("bfloat16, master q8", jnp.bfloat16, "q8"))


def teacher_student(dtype, master, steps: int = 400, layout: str = "tree") -> np.ndarray:
  """The loss of every step of the student (params in ``dtype``)."""
  rng = np.random.default_rng(0)
  teacher = [rng.normal(size=(16, 32)) / 4, rng.normal(size=(32, 1)) / 6]
  params = {"w1": rng.normal(size=(16, 32)) / 4, "w2": rng.normal(size=(32, 1)) / 6}
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  xs = rng.normal(size=(steps, 64, 16)).astype(np.float32)
  ys = np.tanh(xs @ teacher[0]) @ teacher[1]

  def loss_fn(p, x, y):
    pred = jnp.tanh(x.astype(dtype) @ p["w1"]) @ p["w2"]
    return jnp.mean((pred.astype(jnp.float32) - y) ** 2)

  tx = jadam.adam(3e-4, master_weights=master, layout=layout, mu_dtype=jnp.float32,
                  nu_dtype=jnp.float32)
  state = tx.init(params)

  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for x, y in zip(xs, ys):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  return np.asarray(losses)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--out", default="master_weights.png", help="the plot (PNG)")
  args = parser.parse_args(argv)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  curves = {name: teacher_student(dtype, master, args.steps) for name, dtype, master in RUNS}
  final = {name: float(np.mean(c[-20:])) for name, c in curves.items()}
  reference = final["float32 params"]
  print("| run | final loss (mean of the last 20 steps) | vs float32 params |")
  print("|---|---|---|")
  for name, value in final.items():
    print(f"| {name} | {value:.5f} | {value / reference - 1:+.1%} |")
  fig, ax = plt.subplots(figsize=(8, 4))
  for name, c in curves.items():
    ax.plot(np.convolve(c, np.ones(10) / 10, mode="valid"), label=name)
  ax.set(yscale="log", xlabel="step", ylabel="training loss (10-step mean)",
         title="Teacher-student regression, jadam.adam lr 3e-4")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"saved {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
