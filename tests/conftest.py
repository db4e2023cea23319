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

# Runs that are subprocesses of their own start when collection ends and run
# beside the rest of the suite (which leaves about half a core idle on 2
# cores); the tests that read them run last: ``python -m jadam.bench
# --quick`` (tests/test_bench.py's ``quick_run``) and the notebooks
# (tests/test_notebooks.py).
TESTS = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = sorted(os.path.join(TESTS, "..", "notebooks", f)
                   for f in os.listdir(os.path.join(TESTS, "..", "notebooks"))
                   if f.endswith(".ipynb"))


def _bench_job(out):
  # One plain CPU device; the rows' own kernel= (the bench measures the
  # default and each path by name, whatever $JADAM_KERNEL says).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env.pop("JADAM_KERNEL", None)
  return [sys.executable, "-m", "jadam.bench", "--quick", "--json",
          os.path.join(out, "bench.json"), "--plot", os.path.join(out, "bench.png")], env


def _notebooks_job(out):
  # The environment of a user's session, not the suite's 8 fake devices (a
  # notebook that wants fake devices sets XLA_FLAGS itself), and the defaults
  # a user gets; plots drawn inline.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  env.pop("XLA_FLAGS", None)
  env.pop("JADAM_KERNEL", None)
  return [sys.executable, os.path.join(TESTS, "_run_notebooks.py"), out, *NOTEBOOKS], env


BACKGROUND = {
    "bench": (lambda item: "quick_run" in getattr(item, "fixturenames", ()), _bench_job),
    "notebooks": (lambda item: getattr(item, "originalname", "") == "test_notebook_runs",
                  _notebooks_job),
}
_running = {}


def pytest_collection_modifyitems(session, config, items):
  del session, config
  late = [item for item in items if any(wants(item) for wants, _ in BACKGROUND.values())]
  if late:
    ids = {id(item) for item in late}
    items[:] = [item for item in items if id(item) not in ids] + late


def pytest_collection_finish(session):
  for name, (wants, _) in BACKGROUND.items():
    if any(wants(item) for item in session.items):
      _start(name)


def _start(name):
  out = tempfile.mkdtemp(prefix=f"jadam-{name}-")
  argv, env = BACKGROUND[name][1](out)
  with open(os.path.join(out, "stdout"), "w", encoding="utf-8") as stdout, \
       open(os.path.join(out, "stderr"), "w", encoding="utf-8") as stderr:
    _running[name] = (subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, text=True),
                      out)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  for popen, out in _running.values():
    if popen.poll() is None:
      popen.kill()
      popen.wait()
    shutil.rmtree(out, ignore_errors=True)


def background_result(name: str, timeout: float):
  """``(returncode, stdout, stderr, out_dir)`` of the background run ``name``
  once it has finished (started now if collection did not start it)."""
  if name not in _running:
    _start(name)
  popen, out = _running[name]
  popen.wait(timeout=timeout)
  read = lambda f: open(os.path.join(out, f), encoding="utf-8").read()  # noqa: E731
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
