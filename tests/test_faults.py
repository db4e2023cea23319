"""Bad input to the trainer, the optimizer state and ``python -m jadam.plan``:
each used to crash the process, hang, or fail with an error from deep inside
JAX; each now raises an error that names the argument and what was expected.

The donated-array case ran into a segfault (exit 139) on several devices, so
it runs in a subprocess: the suite survives a regression."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadam
import jadam.parallel
from jadam import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_module():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)",
                allow_module_level=True)


def _loss(params, x):
  return jnp.mean((x @ params["w"]) ** 2)


def _trainer(strategy="shard_map", loss_fn=_loss, **kwargs):
  mesh = jax.make_mesh((8,), ("data",))
  return jadam.parallel.DataParallel(
      loss_fn, jadam.adam(1e-2), mesh, strategy=strategy, **kwargs)


PARAMS = {"w": np.ones((3, 2), np.float32)}
BATCH = np.ones((8, 3), np.float32)


_DONATED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    import jadam, jadam.parallel
    mesh = jax.make_mesh((2,), ("data",))
    for strategy, layout in [("shard_map", "tree"), ("shard_map", "flat"),
                             ("pmap", "tree"), ("zero2", "tree"),
                             ("onebit", "tree")]:
      trainer = jadam.parallel.DataParallel(
          lambda p, x: jnp.mean((x @ p["w"]) ** 2), jadam.adam(1e-2), mesh,
          strategy=strategy, layout=layout)
      params, state = trainer.init({"w": np.ones((3, 2), np.float32)})
      batch = np.ones((4, 3), np.float32)
      trainer.step(params, state, batch)  # donates params and state
      try:
        trainer.step(params, state, batch)
      except ValueError as e:
        print(strategy, layout, "ValueError:", e, flush=True)
      else:
        print(strategy, layout, "no error", flush=True)
""")


def test_stepping_donated_arrays_raises_instead_of_crashing():
  proc = subprocess.run([sys.executable, "-c", _DONATED], capture_output=True,
                        text=True, timeout=240, cwd=ROOT)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 5, proc.stdout
  for line in lines:
    assert "ValueError: `DataParallel.step(params=...)`: the array at params" in line, line
    assert "donated to an earlier `step`" in line, line


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "zero1"])
def test_loss_fn_output_is_checked(strategy):
  cases = [
      (lambda p, x: (x @ p["w"]) ** 2, False,
       r"`loss_fn\(params, batch\)` must return the loss as a float scalar .*"
       r"got an array of shape \(1, 2\) and dtype float32 \(each device"),
      (lambda p, x: jnp.sum(x @ p["w"]).astype(jnp.int32), False,
       r"float scalar .*got an array of shape \(\) and dtype int32 \(cast"),
      (lambda p, x: (_loss(p, x), {"n": 1.0}), False,
       r"returned a tuple of 2; .*pass has_aux=True"),
      (_loss, True, r"with has_aux=True, .*must return a pair `\(loss, aux\)`, "
       r"got an array of shape \(\) and dtype float32"),
      (lambda p, x: (_loss(p, x), 1.0, 2.0), True, r"got a tuple of 3"),
  ]
  for loss_fn, has_aux, match in cases:
    trainer = _trainer(strategy, loss_fn, has_aux=has_aux)
    params, state = trainer.init(PARAMS)
    with pytest.raises(TypeError, match=match):
      trainer.step(params, state, BATCH)


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "zero1"])
def test_empty_batch(strategy):
  trainer = _trainer(strategy)
  params, state = trainer.init(PARAMS)
  with pytest.raises(ValueError, match=r"the global batch is empty \(0 rows\): "
                     r"every `batch` leaf needs at least 8 rows"):
    trainer.step(params, state, BATCH[:0])


def test_pmap_params_without_the_device_axis():
  trainer = _trainer("pmap")
  params, state = trainer.init(PARAMS)
  with pytest.raises(ValueError, match=r"`params\['w'\]` has shape \(3, 2\) .*"
                     r"expects \(8, 3, 2\) float32"):
    trainer.step(PARAMS, state, BATCH)
  with pytest.raises(ValueError, match=r"`opt_state\[0\]\.count` has shape \(\) "
                     r".*expects \(8,\) int32"):
    trainer.step(params, jadam.adam(1e-2).init(PARAMS), BATCH)


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_float_count(layout):
  opt = jadam.adam(1e-2, layout=layout)
  params = jax.tree.map(jnp.asarray, PARAMS)
  state = opt.init(params)
  bad = jax.tree.map(
      lambda a: a.astype(jnp.float32) if a.dtype == jnp.int32 else a, state)
  with pytest.raises(TypeError, match=r"step `count` must be an integer array "
                     r"\(int32, as `init` makes it\), got float32"):
    opt.update(params, bad, params)
  trainer = _trainer(layout=layout)
  params, state = trainer.init(PARAMS)
  bad = jax.tree.map(
      lambda a: a.astype(jnp.float32) if a.dtype == jnp.int32 else a, state)
  with pytest.raises(ValueError, match=r"`opt_state\[0\]\.count` has shape \(\) "
                     r"and dtype float32; this trainer's layout expects \(\) int32"):
    trainer.step(params, bad, BATCH)


def test_state_of_another_model():
  trainer = _trainer()
  params, state = trainer.init(PARAMS)
  other = _trainer().init({"w": np.ones((3, 2), np.float32),
                           "b": np.zeros(2, np.float32)})[1]
  with pytest.raises(ValueError, match=r"`opt_state` does not have the structure "
                     r"this trainer's `init` returned.*unexpected"):
    trainer.step(params, other, BATCH)


@pytest.mark.parametrize("argv,match", [
    (["--params", "nan"], r"argument --params: expected a positive whole number"),
    (["--params", "-5"], r"argument --params: expected a positive whole number"),
    (["--params", "1.5"], r"argument --params: expected a positive whole number"),
    (["--leaves", "0"], r"argument --leaves: expected a positive whole number"),
    (["--devices", "0"], r"argument --devices: expected a positive whole number"),
    (["--params", "2", "--leaves", "3"], r"--leaves \(3\) cannot exceed --params \(2\)"),
])
def test_plan_cli_rejects_bad_counts(argv, match, capsys):
  with pytest.raises(SystemExit) as exit_info:
    plan.main(argv)
  assert exit_info.value.code == 2
  assert re.search(match, capsys.readouterr().err)


def test_plan_rows_rejects_bad_counts():
  with pytest.raises(ValueError, match=r"plan_rows\(num_params=...\)` must be a "
                     r"positive integer, got -5"):
    plan.plan_rows(-5, [1], ["float32"])
  with pytest.raises(ValueError, match=r"plan_rows\(leaves=...\)` must be a "
                     r"positive integer, got 0"):
    plan.plan_rows(10, [1], ["float32"], leaves=0)


def test_init_and_has_aux_are_checked():
  with pytest.raises(ValueError, match=r"`DataParallel\(has_aux=...\)` must be "
                     r"True or False, got 'yes'"):
    _trainer(has_aux="yes")
  trainer = _trainer()
  for bad in (None, {}, {"w": None}):
    with pytest.raises(ValueError, match=r"`DataParallel.init\(params=...\)` must "
                       r"contain at least one array"):
      trainer.init(bad)
  with pytest.raises(ValueError, match=r"the leaf at \['b'\] must be an array, "
                     r"got str 'abc'"):
    trainer.init({"w": np.ones(2, np.float32), "b": "abc"})
