"""Test configuration: 8 fake CPU devices, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def default_kernel_mode(monkeypatch):
  """Runs a test under the default meaning of ``kernel="auto"``, whatever
  ``$JADAM_KERNEL`` says: for tests of the promise the default makes (the
  optax drop-in's updates are optax's bits, XLA's ops). ``JADAM_KERNEL=fused
  pytest`` runs every other test with the kernel wherever it can run;
  ``tests/test_kernel.py`` holds the kernel itself to a NumPy reference and
  to optax."""
  monkeypatch.delenv("JADAM_KERNEL", raising=False)
