"""Executes notebooks top to bottom with nbclient, as a user's "Run all":
``python tests/_run_notebooks.py OUT_DIR NOTEBOOK...``. Each executed notebook
is written to ``OUT_DIR/<name>``; a notebook that raised also leaves
``OUT_DIR/<name>.error`` with the error. Started in the background by
``tests/conftest.py``; read by ``tests/test_notebooks.py``."""

from __future__ import annotations

import pathlib
import sys
import traceback

import nbclient
import nbformat

CELL_TIMEOUT_S = 300


def main(out_dir: str, *paths: str) -> int:
  out = pathlib.Path(out_dir)
  for path in map(pathlib.Path, paths):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}})
    try:
      client.execute()  # raises CellExecutionError, with the cell, on an error
    except Exception:  # pylint: disable=broad-exception-caught  (reported by the test)
      (out / f"{path.name}.error").write_text(traceback.format_exc(), encoding="utf-8")
    nbformat.write(nb, out / path.name)
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
