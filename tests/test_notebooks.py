"""Every notebook in notebooks/ runs top to bottom without an error, checks
its own claims with asserts (against optax, or a one-device run), and draws
its plots (executed with nbclient, like a user's "Run all")."""

from __future__ import annotations

import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  # The kernel is a new process that inherits this environment: give it
  # the environment of a user's session, not the test suite's 8 fake devices
  # (a notebook that wants fake devices sets XLA_FLAGS itself).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JADAM_KERNEL", raising=False)  # the defaults a user gets
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(path, as_version=4)
  # A notebook that only prints its claim cannot fail on it.
  assert any(re.search(r"^\s*(assert |np\.testing\.assert_)", c.source, re.M)
             for c in nb.cells if c.cell_type == "code"), (
                 f"{path.name} asserts none of its claims")
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, with the cell, on an error

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{path.name} drew no plot"
