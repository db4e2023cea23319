"""The benchmark harness: cases, implementations, timing, table, JSON and plot.

Method (the same for every case and implementation):

* Every JAX step is ``jax.jit(step, donate_argnums=(0, 1))`` (params and
  optimizer state donated), compiled ahead of time; ``compile_s`` is trace +
  lower + compile of that step.
* After warm-up, the implementations run interleaved: round after round, each
  runs a few steps, so all see the same machine load (each round starts with
  another implementation; the first step after a switch is not timed). Each
  step is timed to completion (``block_until_ready``); ``median_ms`` is the
  median over all
  timed steps (at least 20 by default); ``iqr_ms`` is their interquartile
  range, the noise to read a ratio against.
* A reference in-place read+write of one large float32 buffer (a donated
  ``-x``) is interleaved in the same rounds: its rate is the measured
  memory-copy bandwidth ``copy_gb_per_s`` (bytes read + written per second).
* ``bytes_per_param`` is a model of the least traffic a one-pass step can
  have, read from the sizes of the arrays the step is given: gradients read
  once, params and optimizer state each read and written once, ``(grads + 2
  params + 2 state) / n_params`` bytes (28 for float32 Adam: read p, g, m, v;
  write p, m, v; plus the step count and any flat-buffer padding; 12 for
  SGD). With q8 moments the state is each moment's uint8 codes and float32
  block scales (``state_bytes_per_param``, the summed ``nbytes`` of the state
  leaves per param, about 2.03 where every leaf is quantized).
  ``gb_per_s`` is ``bytes_per_param * n_params / median time``, a model, not
  a counter; ``bandwidth_fraction`` is ``gb_per_s / copy_gb_per_s``.
* ``xla_bytes_per_param`` (JAX, optimizer cases) is counted from the
  compiled program: XLA's cost analysis ``bytes accessed`` (operands and
  outputs of every top-level instruction, each fusion once) per param. It
  shows the passes the compiled step really makes (about 40 for float32
  Adam on CPU: three loop fusions, not one).
* ``peak_bytes`` (JAX) is the compiled step's static buffer assignment from
  ``compiled.memory_analysis()``: arguments + outputs - donated aliases +
  temporaries. For torch it is the CUDA allocator's peak on GPU, else None.
* ``max_abs_diff_vs_optax`` and ``max_rel_diff_vs_optax`` check that each
  implementation computes what optax does: after the run, its params against
  optax's params after the same number of steps (``diff_steps``: warm-up,
  untimed and timed steps together) from the same initial params with the
  same gradients (same batch in the train case). The maximum over all
  elements of ``|p - p_optax|`` and of ``|p - p_optax| / |p_optax|``
  (elements where ``p_optax == 0`` count in the absolute one only), in the
  params' dtype, at least float32. 0 for optax itself; None for
  ``optax_sgd`` (not Adam). The ``*_q8`` rows (8-bit moments) approximate
  Adam: theirs is the measured distance of quantized Adam from optax's
  float32 Adam on the same case, not a correctness check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._runners import CASES
from ._runners import Runner
from ._runners import TorchRunner
from ._runners import _copy_runner
from ._runners import build_optimizer_runners
from ._runners import build_train_runners
from ._runners import make_cases
from ._runners import torch_available
from .. import _kernel

IMPLS = (
    "optax",
    "jadam_tree",
    "jadam_tree_fused",
    "jadam_step_fused",
    "jadam_flat_tree_io",
    "jadam_flat_tree_io_xla",
    "jadam_flat",
    "jadam_flat_fused",
    "jadam_tree_q8",
    "jadam_tree_q8_xla",
    "jadam_flat_q8",
    "jadam_flat_q8_fused",
    "torch_fused",
    "torch_foreach",
    "optax_sgd",
)
IMPL_HELP = {
    "optax": "optax.adam + optax.apply_updates",
    "jadam_tree": "jadam.adam (tree layout) + optax.apply_updates",
    "jadam_tree_fused": ("jadam.adam(kernel='fused') (tree layout; the fused multi-tensor "
                         "CPU kernel, one call for all leaves) + optax.apply_updates"),
    "jadam_step_fused": ("jadam.step(kernel='fused') on tree params, grads and state "
                         "(update and apply in one pass, in place; what kernel='auto' "
                         "runs on CPU)"),
    "jadam_flat_tree_io": ("jadam.adam(layout='flat'): tree grads in, tree updates out "
                           "(on CPU the kernel reads and writes the leaves of buffers "
                           "shared by several leaves in place of packing them)"),
    "jadam_flat_tree_io_xla": ("the same with kernel='xla' (packs the gradients, XLA's "
                               "ops on each buffer, unpacks the updates)"),
    "jadam_flat": ("jadam.step(kernel='xla') on packed params/grads/state (flat end to "
                   "end, XLA's ops)"),
    "jadam_flat_fused": ("jadam.step(kernel='fused') on packed params/grads/state (what "
                         "kernel='auto' runs on CPU)"),
    "jadam_tree_q8": ("jadam.adam(mu_dtype='q8', nu_dtype='q8') (tree layout; 8-bit "
                      "block-wise moments, float32 under 4096 elements) + optax.apply_updates"),
    "jadam_tree_q8_xla": ("the same with kernel='xla' (XLA's decode, update and encode; "
                          "the default runs the kernel where it builds)"),
    "jadam_flat_q8": ("jadam.step(kernel='xla') with q8 moments on packed params/grads/"
                      "state, in the buffers of the q8 layout='flat' state (flat end to end, "
                      "XLA's ops)"),
    "jadam_flat_q8_fused": ("the same with kernel='fused': decoded, updated and encoded in "
                            "one pass (what kernel='auto' runs on CPU)"),
    "torch_fused": "torch.optim.Adam(fused=True)",
    "torch_foreach": "torch.optim.Adam(foreach=True)",
    "optax_sgd": ("reference, not Adam: optax.sgd + optax.apply_updates, the cheapest "
                  "tree-in/tree-out step (no state); its time is the per-leaf floor"),
}




# ------------------------------------------------------------------ timing


def _interleaved_times(runners: dict[str, Runner], steps: int, rounds: int,
                       warmup: int, progress) -> dict[str, list[float]]:
  for r in runners.values():
    for _ in range(warmup):
      r.step()
  per_round = max(1, -(-steps // rounds))
  times: dict[str, list[float]] = {k: [] for k in runners}
  names = list(runners)
  for i in range(rounds):
    # Each round starts with another implementation, and the first step after
    # a switch (caches and pages of the previous one) is not timed.
    for name in names[i % len(names):] + names[:i % len(names)]:
      r = runners[name]
      r.step()
      for _ in range(per_round):
        t0 = time.perf_counter()
        r.step()
        times[name].append(time.perf_counter() - t0)
    progress()
  return times


@jax.jit
def _leaf_diffs(x, ref):
  dtype = jnp.promote_types(ref.dtype, jnp.float32)
  x, ref = x.astype(dtype), ref.astype(dtype)
  diff = jnp.abs(x - ref)
  rel = jnp.where(ref != 0, diff / jnp.where(ref != 0, jnp.abs(ref), 1), 0)
  # max of an empty leaf: 0
  return jnp.stack([jnp.max(diff, initial=0), jnp.max(rel, initial=0)])


def params_diff(leaves: list, ref_leaves: list) -> tuple[float, float]:
  """``(max |x - ref|, max |x - ref| / |ref|)`` over all elements of two
  lists of leaves (the relative one where ``ref != 0``), computed on device
  leaf by leaf (no full-size copy to the host)."""
  if len(leaves) != len(ref_leaves):
    raise ValueError(f"{len(leaves)} leaves against {len(ref_leaves)}")
  per_leaf = []
  for x, ref in zip(leaves, ref_leaves):
    if np.shape(x) != np.shape(ref):
      raise ValueError(f"a leaf of shape {np.shape(x)} against {np.shape(ref)}")
    per_leaf.append(_leaf_diffs(jnp.asarray(x), ref))
  if not per_leaf:
    return 0.0, 0.0
  # NaN propagates: a NaN param shows as a NaN difference.
  abs_max, rel_max = np.asarray(jnp.max(jnp.stack(per_leaf), axis=0))
  return float(abs_max), float(rel_max)


def _diffs_vs_optax(runners: dict[str, Runner]) -> dict[str, tuple]:
  """Per implementation ``(max abs diff, max rel diff, steps)`` of its params
  from optax's, after the same number of steps from the same start."""
  ref = runners.get("optax")
  if ref is None:
    return {}
  ref_leaves = ref.params()
  out = {}
  for impl, r in runners.items():
    if impl == "optax_sgd" or impl.startswith("_"):
      continue  # optax_sgd is not Adam; "_copy" is the bandwidth reference
    if r.steps_run != ref.steps_run:
      raise RuntimeError(
          f"jadam.bench: {impl} ran {r.steps_run} steps and optax {ref.steps_run}; "
          "their params cannot be compared")
    out[impl] = params_diff(r.params(), ref_leaves) + (r.steps_run,)
  return out


def run(
    cases=CASES,
    impls=IMPLS,
    *,
    quick: bool = False,
    device: str = "cpu",
    steps: int | None = None,
    rounds: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
  """Runs the benchmark and returns one record per (case, implementation).

  Args:
    cases: case names among :data:`CASES`.
    impls: implementation names among :data:`IMPLS`; torch ones are skipped
      (with a note) when torch is not importable.
    quick: tiny sizes and few steps (a smoke test, not a measurement).
    device: ``"cpu"`` or ``"gpu"``.
    steps: timed steps per implementation (default 25; 6 with ``quick``).
    rounds: interleaving rounds (default 5; 2 with ``quick``).
    log: where progress notes go.

  Returns:
    Records with keys ``case, impl, median_ms, speedup_vs_optax, compile_s,
    gb_per_s, bandwidth_fraction, peak_bytes, max_abs_diff_vs_optax,
    max_rel_diff_vs_optax`` and context (``iqr_ms``: the
    interquartile range of the step times, ``n_params``,
    ``n_leaves``, ``bytes_per_param``, ``state_bytes``, ``state_bytes_per_param``,
    ``xla_bytes_per_param``, ``copy_gb_per_s``, ``steps``,
    ``diff_steps``: the steps after which params were compared with optax's,
    ``device``, ``peak_source``, ``title``). The differences are None
    without an optax row and for ``optax_sgd``.
  """
  if device not in ("cpu", "gpu"):
    raise ValueError(f"`device` must be 'cpu' or 'gpu', got {device!r}")
  try:
    jax_device = jax.devices(device)[0]
  except RuntimeError as e:
    raise SystemExit(f"jadam.bench: no JAX {device} device ({e})") from None
  # Idle OpenMP threads that spin starve everything else on a small shared
  # machine (torch's small steps ran 50x slower with the default policy here).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  steps = steps or (6 if quick else 25)
  rounds = rounds or (2 if quick else 5)
  all_cases = make_cases(quick, device)
  unknown = [c for c in cases if c not in all_cases] + [i for i in impls if i not in IMPLS]
  if unknown:
    raise ValueError(f"unknown cases/implementations {unknown}; cases: {CASES}, impls: {IMPLS}")
  if not torch_available():
    dropped = [i for i in impls if i.startswith("torch")]
    if dropped:
      log(f"note: torch is not installed; skipping {', '.join(dropped)}")
    impls = [i for i in impls if not i.startswith("torch")]
  fused = [i for i in impls if i.endswith("_fused") and not i.startswith("torch")]
  if fused and not _kernel.available():
    log(f"note: jadam's fused kernel is not available here; skipping {', '.join(fused)}")
    impls = [i for i in impls if i not in fused]
  copy_elems = (1 << 20) if quick else (1 << 28 if device == "gpu" else 1 << 26)

  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(cases) * rounds, desc="jadam.bench", disable=None, file=sys.stderr)
  except ImportError:
    bar = None

  records = []
  with jax.default_device(jax_device):
    for name in cases:
      case = all_cases[name]
      if bar is not None:
        bar.set_postfix_str(f"case {name}: compiling")
      if case.kind == "train":
        runners, n_params, n_leaves = build_train_runners(
            case, [i for i in impls if not i.startswith("torch")], jax_device)
      else:
        runners, n_params, n_leaves = build_optimizer_runners(case, impls, device, jax_device)
      runners["_copy"] = _copy_runner(copy_elems, jax_device)
      if bar is not None:
        bar.set_postfix_str(f"case {name}: timing")
      times = _interleaved_times(
          runners, steps, rounds, warmup=2,
          progress=(lambda: None) if bar is None else (lambda: bar.update(1)),
      )
      diffs = _diffs_vs_optax(runners)
      copy_s = statistics.median(times.pop("_copy"))
      copy_gbs = 2 * 4 * copy_elems / copy_s / 1e9
      runners.pop("_copy").close()
      base = statistics.median(times["optax"]) if "optax" in times else None
      for impl, ts in times.items():
        r = runners[impl]
        med = statistics.median(ts)
        peak = r.peak() if isinstance(r, TorchRunner) else r.peak_bytes
        param_bytes, state_bytes, input_bytes = r.array_bytes()
        model_bytes = xla_bytes = None
        if case.kind == "optimizer":  # the other input is the gradients
          model_bytes = (input_bytes + 2 * param_bytes + 2 * state_bytes) / n_params
          if r.xla_bytes_accessed is not None:
            xla_bytes = r.xla_bytes_accessed / n_params
        gbs = model_bytes * n_params / med / 1e9 if model_bytes is not None else None
        q1, _, q3 = statistics.quantiles(ts, n=4)
        abs_diff, rel_diff, diff_steps = diffs.get(impl, (None, None, None))
        records.append(dict(
            case=name, impl=impl, median_ms=med * 1e3, iqr_ms=(q3 - q1) * 1e3,
            speedup_vs_optax=(base / med) if base else None,
            compile_s=r.compile_s, gb_per_s=gbs,
            bandwidth_fraction=(gbs / copy_gbs) if gbs is not None else None,
            peak_bytes=peak, title=case.title, n_params=int(n_params), n_leaves=int(n_leaves),
            bytes_per_param=model_bytes, state_bytes=int(state_bytes),
            state_bytes_per_param=state_bytes / n_params, xla_bytes_per_param=xla_bytes,
            copy_gb_per_s=copy_gbs, steps=len(ts), device=str(jax_device),
            peak_source=r.peak_source, max_abs_diff_vs_optax=abs_diff,
            max_rel_diff_vs_optax=rel_diff, diff_steps=diff_steps,
        ))
        r.close()
      del runners
  if bar is not None:
    bar.close()
  return records


# ----------------------------------------------------------------- output


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _fmt_diff(r: dict) -> str:
  a, b = r.get("max_abs_diff_vs_optax"), r.get("max_rel_diff_vs_optax")
  if a is None:
    return "-"
  if a == 0 and b == 0:
    return "0"
  return f"{a:.0e}/{b:.0e}"


def format_table(records: list[dict]) -> str:
  """A fixed-width text table (also valid Markdown)."""
  head = ("case", "impl", "params", "leaves", "median ms", "IQR", "vs optax", "compile s",
          "state B/param", "B/param (model)", "GB/s (model)", "of copy BW", "XLA B/param",
          "peak MB", "diff vs optax abs/rel")
  rows = [head]
  for r in records:
    rows.append((
        f"({r['case']}) {r['title']}", r["impl"], f"{r['n_params'] / 1e6:.2f}M",
        str(r["n_leaves"]), _fmt(r["median_ms"], ".2f"),
        f"{100 * r['iqr_ms'] / r['median_ms']:.0f}%",
        _fmt(r["speedup_vs_optax"], ".2f") + ("x" if r["speedup_vs_optax"] else ""),
        _fmt(r["compile_s"], ".2f"), _fmt(r.get("state_bytes_per_param"), ".2f"),
        _fmt(r["bytes_per_param"], ".2f"), _fmt(r["gb_per_s"], ".2f"),
        "-" if r["bandwidth_fraction"] is None else f"{100 * r['bandwidth_fraction']:.0f}%",
        _fmt(r.get("xla_bytes_per_param"), ".1f"),
        "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}",
        _fmt_diff(r),
    ))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def save_plot(records: list[dict], path: str) -> None:
  """A grouped bar chart of speed-up vs optax per case (log scale), as PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  cases = list(dict.fromkeys(r["case"] for r in records))
  impls = [i for i in IMPLS if any(r["impl"] == i for r in records)]
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2), 4.5))
  width = 0.8 / max(1, len(impls))
  for j, impl in enumerate(impls):
    xs, ys = [], []
    for i, c in enumerate(cases):
      r = next((r for r in records if r["case"] == c and r["impl"] == impl), None)
      if r is not None and r["speedup_vs_optax"]:
        xs.append(i + (j - (len(impls) - 1) / 2) * width)
        ys.append(r["speedup_vs_optax"])
    ax.bar(xs, ys, width, label=impl)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_yscale("log")
  titles = {r["case"]: r["title"] for r in records}
  ax.set_xticks(range(len(cases)), [f"({c}) {titles[c]}" for c in cases], fontsize=8)
  ax.set_ylabel("speed-up vs optax.adam (same run)")
  ax.set_title(f"jadam.bench on {records[0]['device'] if records else '?'}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _parse_list(s: str, allowed) -> list[str]:
  out = [x.strip() for x in s.split(",") if x.strip()]
  bad = [x for x in out if x not in allowed]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
  if not out:
    raise argparse.ArgumentTypeError(f"expected at least one of {','.join(allowed)}")
  return out


def _positive_int(s: str) -> int:
  try:
    value = int(s)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
  return value


def main(argv: list[str] | None = None) -> int:
  """Command line: ``python -m jadam.bench [--quick] [--json PATH] [--plot PATH] ...``."""
  parser = argparse.ArgumentParser(
      prog="python -m jadam.bench",
      description=("One Adam step: jadam (tree, flat; float32 and q8 moments) against optax "
                   "and torch, in one run."),
      epilog="implementations: " + "; ".join(f"{k}: {v}" for k, v in IMPL_HELP.items()),
  )
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few steps (a smoke test, seconds)")
  parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
  parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speed-ups")
  parser.add_argument("--cases", type=lambda s: _parse_list(s, CASES), default=list(CASES),
                      help="comma-separated cases among a,b,c,d,e (default: all)")
  parser.add_argument("--impls", type=lambda s: _parse_list(s, IMPLS), default=list(IMPLS),
                      help="comma-separated implementations (default: all available)")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--steps", type=_positive_int, default=None,
                      help="timed steps per implementation (default 25, quick 6)")
  args = parser.parse_args(argv)
  impls = args.impls
  if "optax" not in impls:
    impls = ["optax"] + impls  # the baseline of every ratio
  t0 = time.perf_counter()
  print(f"jadam.bench  {datetime.date.today().isoformat()}  jax {jax.__version__}  "
        f"optax {optax.__version__}  {platform.machine()} {os.cpu_count()} CPU cores  "
        f"device {args.device}{'  (quick)' if args.quick else ''}", flush=True)
  records = run(args.cases, impls, quick=args.quick, device=args.device, steps=args.steps)
  print(format_table(records))
  copies = {r["case"]: r["copy_gb_per_s"] for r in records}
  print("measured copy bandwidth (GB/s, read+write): "
        + ", ".join(f"({c}) {v:.1f}" for c, v in copies.items()))
  print(f"total {time.perf_counter() - t0:.0f} s")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(records, f, indent=1)
  if args.plot:
    save_plot(records, args.plot)
  return 0
