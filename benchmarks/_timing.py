"""Shared by the scripts in benchmarks/: the time of a compiled step that
carries ``(params, state)`` into its next call, and each form in a fresh
process (a form's compiled code and allocations do not touch the next's)."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def carried_ms(compiled, params, state, *rest, steps: int, warmup: int = 3) -> dict:
  """``{"median_ms", "iqr_ms"}`` of ``steps`` calls ``params, state =
  compiled(params, state, *rest)`` after ``warmup`` untimed ones."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  for _ in range(warmup):
    params, state = compiled(params, state, *rest)
  jax.block_until_ready(params)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, state = compiled(params, state, *rest)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
  return dict(median_ms=1e3 * float(np.median(times)),
              iqr_ms=1e3 * float(np.subtract(*np.percentile(times, [75, 25]))))


def in_fresh_process(script: str, *args: str) -> dict:
  """The JSON line that ``python script *args`` prints last."""
  out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out.strip().splitlines()[-1])
