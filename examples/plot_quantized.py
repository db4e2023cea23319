"""Validation loss of train_lm.py with float32, q8 and q4 Adam moments.

Runs ``examples/train_lm.py`` once per moment format (``--mu-dtype`` and
``--nu-dtype`` both set to it; same seed, same batches, everything else
equal), reads the validation loss it prints every ``--log-every`` steps and
the optimizer state's bytes per parameter, and plots the curves side by side
with their gap to float32 moments. Prints the final validation losses as a
Markdown table.

  python examples/plot_quantized.py --out docs/quantized_moments.png
  python examples/plot_quantized.py --steps 100 -- --d-model 64  # after --:
                                                  # more train_lm.py flags
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

TRAIN_LM = pathlib.Path(__file__).resolve().parent / "train_lm.py"
FORMATS = ("float32", "q8", "q4")
VAL_LINE = re.compile(r"^step +(\d+)  train loss ([\d.]+)  val loss ([\d.]+)$",
                      re.M)
STATE_LINE = re.compile(r"^optimizer state: ([\d,]+) bytes on device 0 "
                        r"\(([\d.]+) B/param\), (\d+) quantized moments$", re.M)


def run(fmt: str, args: argparse.Namespace, extra: list[str]) -> dict:
  """One train_lm.py run with ``fmt`` moments: its curve and state bytes."""
  cmd = [sys.executable, str(TRAIN_LM), "--mu-dtype", fmt, "--nu-dtype", fmt,
         "--steps", str(args.steps), "--log-every", str(args.log_every),
         "--seed", str(args.seed), "--sample-chars", "0", *extra]
  print("$", " ".join(cmd[1:]), flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.exit(f"train_lm.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  curve = [(int(s), float(t), float(v)) for s, t, v in VAL_LINE.findall(proc.stdout)]
  state = STATE_LINE.search(proc.stdout)
  if not curve or not state:
    sys.exit(f"unexpected train_lm.py output:\n{proc.stdout}")
  print(f"  final val loss {curve[-1][2]:.3f}, state {state[2]} B/param, "
        f"{state[3]} quantized moments", flush=True)
  return {"curve": curve, "bytes_per_param": float(state[2]),
          "quantized": int(state[3])}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="docs/quantized_moments.png",
                      help="the PNG to write")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--log-every", type=int, default=20,
                      help="steps between validation losses")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  runs = {fmt: run(fmt, args, extra) for fmt in FORMATS}

  base = runs["float32"]["curve"][-1][2]
  print("\n| moments | state B/param | final val loss | vs float32 |")
  print("|---|---|---|---|")
  for fmt, r in runs.items():
    final = r["curve"][-1][2]
    print(f"| {fmt} | {r['bytes_per_param']:.2f} | {final:.3f} | "
          f"{100 * (final - base) / base:+.2f}% |")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  base_curve = {s: v for s, _, v in runs["float32"]["curve"]}
  for i, (fmt, r) in enumerate(runs.items()):
    steps = [s for s, _, _ in r["curve"]]
    val = [v for _, _, v in r["curve"]]
    label = (f"{fmt} ({r['bytes_per_param']:.2f} B/param state): "
             f"final {val[-1]:.3f}")
    ax1.plot(steps, val, "o-", ms=2.5, lw=1.2, color=f"C{i}", label=label)
    gap = [100 * (v - base_curve[s]) / base_curve[s] for s, v in zip(steps, val)]
    ax2.plot(steps, gap, "o-", ms=2.5, lw=1.2, color=f"C{i}", label=fmt)
  ax1.set(xlabel="step", ylabel="validation cross-entropy",
          title="Validation loss")
  ax1.legend(fontsize=8)
  for level, style in ((2, "--"), (4, ":")):
    for sign in (1, -1):
      ax2.axhline(sign * level, color="k", ls=style, lw=0.8)
  ax2.set(xlabel="step", ylabel="% vs float32 moments",
          title="Gap to float32 moments (lines: ±2%, ±4%)")
  ax2.legend(fontsize=8)
  fig.suptitle("train_lm.py (char transformer, jadam.adamw, seed "
               f"{args.seed}): float32 vs quantized Adam moments",
               fontsize=10)
  fig.tight_layout()
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"saved {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
