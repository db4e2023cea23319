"""Test configuration: 8 fake CPU devices, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402  pylint: disable=wrong-import-position
import subprocess  # noqa: E402  pylint: disable=wrong-import-position
import sys  # noqa: E402  pylint: disable=wrong-import-position
import tempfile  # noqa: E402  pylint: disable=wrong-import-position

import pytest  # noqa: E402  pylint: disable=wrong-import-position

# ``python -m jadam.bench --quick`` (tests/test_bench.py's ``quick_run``) is a
# subprocess of its own: it starts when collection ends and runs beside the
# rest of the suite; the tests that read it run last.
BENCH_FIXTURE = "quick_run"
_bench_run = {}


def pytest_collection_modifyitems(session, config, items):
  del session, config
  late = [item for item in items if BENCH_FIXTURE in getattr(item, "fixturenames", ())]
  if late:
    ids = {id(item) for item in late}
    items[:] = [item for item in items if id(item) not in ids] + late


def pytest_collection_finish(session):
  if any(BENCH_FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
    _start_bench()


def _start_bench():
  out = tempfile.mkdtemp(prefix="jadam-bench-")
  # One plain CPU device; the rows' own kernel= (the bench measures the
  # default and each path by name, whatever $JADAM_KERNEL says).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env.pop("JADAM_KERNEL", None)
  with open(os.path.join(out, "stdout"), "w", encoding="utf-8") as stdout, \
       open(os.path.join(out, "stderr"), "w", encoding="utf-8") as stderr:
    popen = subprocess.Popen(
        [sys.executable, "-m", "jadam.bench", "--quick",
         "--json", os.path.join(out, "bench.json"), "--plot", os.path.join(out, "bench.png")],
        env=env, stdout=stdout, stderr=stderr, text=True)
  _bench_run.update(popen=popen, out=out)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _bench_run:
    if _bench_run["popen"].poll() is None:
      _bench_run["popen"].kill()
      _bench_run["popen"].wait()
    shutil.rmtree(_bench_run["out"], ignore_errors=True)


def quick_bench_run(timeout: float):
  """``(returncode, stdout, stderr, out_dir)`` of the background quick bench
  run, once it has finished (started here if collection did not start it)."""
  if not _bench_run:
    _start_bench()
  popen, out = _bench_run["popen"], _bench_run["out"]
  popen.wait(timeout=timeout)
  read = lambda name: open(os.path.join(out, name), encoding="utf-8").read()  # noqa: E731
  return popen.returncode, read("stdout"), read("stderr"), out


@pytest.fixture
def default_kernel_mode(monkeypatch):
  """Runs a test under the default meaning of ``kernel="auto"``, whatever
  ``$JADAM_KERNEL`` says: for tests of the promise the default makes (the
  optax drop-in's updates are optax's bits, XLA's ops). ``JADAM_KERNEL=fused
  pytest`` runs every other test with the kernel wherever it can run;
  ``tests/test_kernel.py`` holds the kernel itself to a NumPy reference and
  to optax."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)
