"""``python -m jadam.plan``: memory per device of plain data parallelism,
ZeRO stages 1 and 2, FSDP, 1-bit Adam and local steps, from
:func:`jadam.memory_plan`.

Examples::

  python -m jadam.plan --params 7e9 --devices 8
  python -m jadam.plan --params 124e6 --devices 1 2 8 --moments float32 bfloat16 --markdown
  python -m jadam.plan --measure --fake-devices 8 --params 4e6 --markdown
  python -m jadam.plan --params 7e9 --devices 8 --mu-dtype q8 --nu-dtype q4
  python -m jadam.plan --params 7e9 --param-dtype bfloat16 --moments q8 --master-weights q8
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from . import _validate as V
from ._plan import memory_plan

STRATEGIES = ("plain", "zero1", "zero2", "fsdp", "onebit", "local")


def _tree(num_params: int, leaves: int, dtype) -> list:
  """``num_params`` parameters split over ``leaves`` leaves (shapes only)."""
  V.check_positive_int("jadam.plan.plan_rows", "num_params", num_params)
  V.check_positive_int("jadam.plan.plan_rows", "leaves", leaves)
  if leaves > num_params:
    raise ValueError(f"`jadam.plan.plan_rows(leaves=...)` cannot exceed "
                     f"num_params={num_params}, got {leaves}")
  base, extra = divmod(num_params, leaves)
  return [jax.ShapeDtypeStruct((base + (i < extra),), dtype) for i in range(leaves)]


def _pair(moment):
  """``(mu_dtype, nu_dtype)`` of a ``--moments`` entry (one format for both)
  or of a ``(mu, nu)`` pair."""
  return tuple(moment) if isinstance(moment, (tuple, list)) else (moment, moment)


def _label(moment) -> str:
  mu, nu = _pair(moment)
  return mu if mu == nu else f"{mu}/{nu}"


def plan_rows(num_params: int, devices, moments, *, param_dtype="float32",
              leaves: int = 1, strategies=STRATEGIES,
              accumulation_steps: int = 1, master_weights=None) -> list[dict]:
  """One row per (moment dtype, strategy, device count)."""
  params = _tree(num_params, leaves, np.dtype(param_dtype))
  rows = []
  for moment in moments:
    mu, nu = _pair(moment)
    for strategy in strategies:
      for n in devices:
        plan = memory_plan(params, strategy=strategy, n_devices=n,
                           mu_dtype=mu, nu_dtype=nu,
                           accumulation_steps=accumulation_steps,
                           master_weights=master_weights)
        rows.append({
            "strategy": strategy, "devices": n, "moments": _label(moment),
            "params_bytes": plan.params, "grads_bytes": plan.grads,
            "opt_state_bytes": plan.opt_state, "total_bytes": plan.total,
            "bytes_per_param": {
                "params": round(plan.per_param("params"), 3),
                "grads": round(plan.per_param("grads"), 3),
                "opt_state": round(plan.per_param("opt_state"), 3),
                "total": round(plan.per_param("total"), 3),
            },
        })
  return rows


def format_table(rows: list[dict], *, markdown: bool = False) -> str:
  header = ["moments", "strategy", "devices", "params B/p", "grads B/p",
            "state B/p", "total B/p", "total GiB"]
  body = [[r["moments"], r["strategy"], str(r["devices"]),
           f"{r['bytes_per_param']['params']:.2f}",
           f"{r['bytes_per_param']['grads']:.2f}",
           f"{r['bytes_per_param']['opt_state']:.2f}",
           f"{r['bytes_per_param']['total']:.2f}",
           f"{r['total_bytes'] / 2**30:,.2f}"] for r in rows]
  if markdown:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)
  widths = [max(len(x) for x in col) for col in zip(header, *body)]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths))
                   for row in [header] + body)


def _mlp(num_params: int):
  """Params of an MLP with about ``num_params`` parameters, and its loss."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  width = max(8, min(1024, int(num_params ** 0.5)))
  layers = max(1, round(num_params / (width * width + width)))
  rng = np.random.default_rng(0)
  params = {f"layer_{i}": {
      "w": rng.normal(0, width ** -0.5, (width, width)).astype(np.float32),
      "b": np.zeros((width,), np.float32)} for i in range(layers)}

  def loss_fn(params, batch):
    h = batch["x"]
    for i in range(layers):
      h = jnp.tanh(h @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"])
    return jnp.mean((h - batch["y"]) ** 2)

  return params, loss_fn


def _device0_bytes(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    first = x.sharding._device_assignment[0]  # pylint: disable=protected-access
    total += sum(s.data.nbytes for s in x.addressable_shards if s.device == first)
  return total


def measure(num_params: int, devices, moments, accumulation_steps=(1, 4)) -> dict:
  """Builds real trainers and measures: device 0's bytes of params and
  optimizer state (``addressable_shards``) next to :func:`jadam.memory_plan`,
  and the bytes each device sends per step (:func:`jadam.parallel.comm_bytes`)."""
  import jadam  # pylint: disable=import-outside-toplevel
  import jadam.parallel  # pylint: disable=import-outside-toplevel

  params0, loss_fn = _mlp(num_params)
  count = sum(x.size for x in jax.tree.leaves(params0))
  width = params0["layer_0"]["w"].shape[0]
  memory = []
  for moment in moments:
    mu, nu = _pair(moment)
    for strategy in ("shard_map", "zero1", "zero2", "fsdp", "onebit", "local"):
      for n in devices:
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        optimizer = jadam.adam(1e-3, mu_dtype=mu, nu_dtype=nu)
        trainer = jadam.parallel.DataParallel(loss_fn, optimizer, mesh,
                                              strategy=strategy)
        params, opt_state = trainer.init(params0)
        plan = memory_plan(params0, strategy=strategy, n_devices=n,
                           mu_dtype=mu, nu_dtype=nu)
        got_params, got_state = _device0_bytes(params), _device0_bytes(opt_state)
        memory.append({
            "strategy": "plain" if strategy == "shard_map" else strategy,
            "devices": n, "moments": _label(moment),
            "params_bytes": got_params, "opt_state_bytes": got_state,
            "grads_bytes": plan.grads,
            "bytes_per_param": {
                "params": round(got_params / count, 3),
                "grads": round(plan.grads / count, 3),
                "opt_state": round(got_state / count, 3),
                "total": round((got_params + plan.grads + got_state) / count, 3)},
            "total_bytes": got_params + plan.grads + got_state,
            "matches_plan": (got_params, got_state) == (plan.params, plan.opt_state),
        })
        del params, opt_state
  comm = []
  n = max(devices)
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  rng = np.random.default_rng(1)
  for k in accumulation_steps:
    batch = {"x": rng.normal(size=(2 * n * k, width)).astype(np.float32),
             "y": rng.normal(size=(2 * n * k, width)).astype(np.float32)}
    for strategy in jadam.parallel.available_strategies():
      trainer = jadam.parallel.DataParallel(loss_fn, jadam.adam(1e-3), mesh,
                                            strategy=strategy,
                                            accumulation_steps=k)
      params, opt_state = trainer.init(params0)
      reports = {strategy: jadam.parallel.comm_report(trainer, params, opt_state, batch)}
      if strategy == "onebit":  # the step after the warm-up: compressed
        after = np.int32(jadam.parallel.OneBit().warmup_steps)
        compressed = opt_state._replace(
            count=jax.device_put(after, opt_state.count.sharding))
        reports["onebit (compressed)"] = jadam.parallel.comm_report(
            trainer, params, compressed, batch)
      for name, report in reports.items():
        comm.append({"strategy": name, "devices": n, "accumulation_steps": k,
                     "bytes_per_device": report.bytes_per_device,
                     "bytes_per_param": round(report.bytes_per_device / count, 3),
                     "by_kind": report.by_kind})
      del params, opt_state
  return {"num_params": count, "memory": memory, "comm": comm}


def format_comm(rows: list[dict], num_params: int, *, markdown: bool = False) -> str:
  plain = {r["accumulation_steps"]: r["bytes_per_device"] for r in rows
           if r["strategy"] == "shard_map"}
  header = ["strategy", "devices", "accum.", "bytes sent/device/step", "B/param",
            "vs shard_map", "collectives (bytes)"]
  body = []
  for r in rows:
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(r["by_kind"].items()))
    ratio = r["bytes_per_device"] / plain[r["accumulation_steps"]]
    body.append([r["strategy"], str(r["devices"]), str(r["accumulation_steps"]),
                 f"{r['bytes_per_device']:,}", f"{r['bytes_per_param']:.3f}",
                 f"{ratio:.3f}", kinds])
  if markdown:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
  widths = [max(len(x) for x in col) for col in zip(header, *body)]
  return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths))
                   for row in [header] + body)


def _count(text: str) -> int:
  """An argparse type: a positive whole number, written as an int or a float
  such as ``7e9``."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not np.isfinite(value) or value < 1 or value != int(value):
    raise argparse.ArgumentTypeError(
        f"expected a positive whole number (such as 7e9), got {text!r}")
  return int(value)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jadam.plan",
      description="Bytes per device of params, gradients and Adam state for "
                  "plain data parallelism, ZeRO stages 1 and 2, FSDP, 1-bit Adam "
                  "and local steps.")
  parser.add_argument("--params", type=_count, default=10**9,
                      help="number of parameters (e.g. 7e9)")
  parser.add_argument("--leaves", type=_count, default=1,
                      help="split the parameters over this many leaves")
  parser.add_argument("--param-dtype", default="float32")
  parser.add_argument("--devices", type=_count, nargs="+", default=[1, 2, 8],
                      help="data-axis device counts")
  parser.add_argument("--moments", nargs="+", default=["float32", "bfloat16"],
                      help="moment dtypes (mu and nu)")
  parser.add_argument("--mu-dtype", metavar="FORMAT",
                      help="first moment's format (a dtype, q8 or q4); with "
                           "--nu-dtype, replaces --moments")
  parser.add_argument("--nu-dtype", metavar="FORMAT",
                      help="second moment's format (a dtype, q8 or q4)")
  parser.add_argument("--master-weights", default=None, choices=("float32", "q8"),
                      help="count master weights for low-precision params")
  parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                      choices=STRATEGIES)
  parser.add_argument("--accumulation-steps", type=_count, default=1)
  parser.add_argument("--markdown", action="store_true",
                      help="print a Markdown table")
  parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  parser.add_argument("--measure", action="store_true",
                      help="build trainers on real (or fake CPU) devices and "
                           "measure bytes per device and comm bytes per step "
                           "(an MLP of about --params parameters)")
  parser.add_argument("--fake-devices", type=_count, metavar="N",
                      help="with --measure on CPU: use N fake CPU devices")
  args = parser.parse_args(argv)
  if args.leaves > args.params:
    parser.error(f"--leaves ({args.leaves}) cannot exceed --params ({args.params})")
  if args.mu_dtype or args.nu_dtype:
    args.moments = [(args.mu_dtype or "float32", args.nu_dtype or "float32")]

  if args.measure:
    if args.fake_devices:
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", args.fake_devices)
    devices = [n for n in args.devices if n <= jax.device_count()]
    result = measure(args.params, devices, args.moments)
    print(f"measured on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s): an MLP of {result['num_params']:,} float32 params")
    print("\nbytes per parameter per device (params and state from "
          "addressable_shards; grads from jadam.memory_plan)")
    print(format_table(result["memory"], markdown=args.markdown))
    mismatched = [r for r in result["memory"] if not r["matches_plan"]]
    print(f"jadam.memory_plan matches the measured params and state: "
          f"{'yes' if not mismatched else f'NO ({mismatched})'}")
    print("\nbytes each device sends per step (jadam.parallel.comm_bytes)")
    print(format_comm(result["comm"], result["num_params"], markdown=args.markdown))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0 if not mismatched else 1

  num_params = args.params
  rows = plan_rows(num_params, args.devices, args.moments,
                   param_dtype=args.param_dtype, leaves=args.leaves,
                   strategies=args.strategies,
                   accumulation_steps=args.accumulation_steps,
                   master_weights=args.master_weights)
  master = f", master weights {args.master_weights}" if args.master_weights else ""
  print(f"{num_params:,} {args.param_dtype} params{master}; bytes per parameter per "
        "device (B/p)")
  print(format_table(rows, markdown=args.markdown))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"num_params": num_params, "param_dtype": args.param_dtype,
                 "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
