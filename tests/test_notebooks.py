"""Every notebook in notebooks/ runs top to bottom without an error, checks
its own claims with asserts (against optax, or a one-device run), and draws
its plots (executed with nbclient, like a user's "Run all")."""

from __future__ import annotations

import pathlib
import re

import pytest

import conftest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  # A notebook that only prints its claim cannot fail on it.
  assert any(re.search(r"^\s*(assert |np\.testing\.assert_)", c.source, re.M)
             for c in nb.cells if c.cell_type == "code"), (
                 f"{path.name} asserts none of its claims")
  # Executed with nbclient (tests/_run_notebooks.py) in a process started
  # when collection ended, in a user's environment (conftest.py).
  returncode, _, stderr, out = conftest.background_result(
      "notebooks", timeout=900)
  assert returncode == 0, stderr[-3000:]
  out = pathlib.Path(out)
  error = out / f"{path.name}.error"
  assert not error.exists(), error.read_text(encoding="utf-8")  # the cell and its error
  nb = nbformat.read(out / path.name, as_version=4)

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{path.name} drew no plot"
