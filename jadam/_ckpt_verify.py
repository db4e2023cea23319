"""A checkpoint's checksums: written with its description at save, compared
with what a restore read, and the error that names a damaged checkpoint's
step, array and file (jadam.checkpoint's helpers)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from . import _checksum
from . import _ckpt_files
from ._ckpt_layout import ITEMS
from ._ckpt_layout import describe
from ._ckpt_layout import keystr


class CheckpointCorruptError(ValueError):
  """A checkpoint's files are damaged: missing, truncated, or not what was
  saved.

  Attributes:
    step: the checkpoint's step (``None`` when no step is intact).
    array: the damaged array's path, e.g. ``"opt_state[0].mu['w']"`` (or a
      description when no single array is to blame).
    file: the damaged file (or directory).
  """

  def __init__(self, message: str, *, step=None, array=None, file=None):
    super().__init__(message)
    self.step, self.array, self.file = step, array, file


def damaged(step, directory, array, file, reason) -> CheckpointCorruptError:
  return CheckpointCorruptError(
      f"checkpoint step {step} in {directory} is damaged: {array}: {reason} "
      f"(file {file})", step=step, array=array, file=file)


def first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return (lines[0] if lines else type(e).__name__)[:300]


def describe_with_checksums(*trees) -> list[list[dict[str, Any]]]:
  """:func:`describe` of each tree, each leaf with its ``checksum``: the
  grid of shards it is saved in (``splits``) and the hash sum of each cell
  (``sums``), added over all processes (a collective: every process calls
  it, with its own shards)."""
  descriptions, cells, local = [], [], []
  for tree in trees:
    descriptions.append(describe(tree))
    for x in jax.tree_util.tree_leaves(tree):
      splits = _checksum.splits_of(x)
      sums = _checksum.cell_sums(x, splits, np.shape(x))
      cells.append((splits, len(sums)))
      local += sums
  _, total = _checksum.all_processes_sum(local, False)
  it = iter(total)
  for entry, (splits, n) in zip((e for d in descriptions for e in d), cells):
    entry["checksum"] = {"splits": splits,
                         "sums": [_checksum.to_hex(next(it)) for _ in range(n)]}
  return descriptions


def param_names(tree, item: str) -> dict[str, str]:
  """orbax's name of every leaf (its key in the files) -> the leaf's path
  (``opt_state[0].mu['w']``)."""
  names = ocp.tree.get_param_names(tree, include_empty_nodes=False)
  return {name: item + jax.tree_util.keystr(path)
          for path, name in jax.tree_util.tree_leaves_with_path(names)}


def verify(directory, step, saved, restored, names, error, replicas) -> None:
  """Checks what a restore read against the saved checksums.

  Every process calls it after its read (``restored``; ``None`` with the
  ``error`` its read raised): the processes add their sums and learn of
  each other's failures in one all-gather, so they all raise or all pass.

  Raises:
    CheckpointCorruptError: naming the step, the array and the file.
  """
  checks = []  # (item, saved leaf, restored leaf or None)
  if saved["version"] >= 2:
    for item in ITEMS:
      read = {keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(
          restored[item])} if restored else {}
      checks += [(item, s, read.get(s["path"])) for s in saved[item]]
  local = []
  try:
    for _, s, x in checks:
      splits = s["checksum"]["splits"]
      n = int(np.prod([len(d) for d in splits]))
      local += [0] * n if x is None else _checksum.cell_sums(x, splits, s["shape"])
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise damaged(step, directory, "the description",
                  os.path.join(directory, str(step), "layout", "metadata"),
                  f"its checksums are malformed ({e!r})") from None
  failed, total = _checksum.all_processes_sum(local, error is not None)
  if failed:
    raise diagnose(directory, step, names, error) from error
  it = iter(total)
  for item, s, _ in checks:
    splits, want = s["checksum"]["splits"], s["checksum"]["sums"]
    # A pmap state onto another device count reads replica 0 only.
    read_shape = [1, *s["shape"][1:]] if replicas else s["shape"]
    covered = _checksum.covered_cells(splits, s["shape"], read_shape)
    got = [_checksum.to_hex(next(it)) for _ in want]
    for cell, (g, w, c) in enumerate(zip(got, want, covered)):
      if c and g != w:
        box = _checksum.cell_box(splits, s["shape"], cell)
        array = item + (s["path"] if s["path"] != "<root>" else "")
        raise _located(directory, step, item, names, array, box,
                       f"its elements {_box(box)} differ from what was saved "
                       f"(checksum {g}, saved {w})")


def diagnose(directory, step, names, error) -> CheckpointCorruptError:
  """The error for a read that failed (here or in another process): finds
  the missing, short or undecodable file."""
  step_dir = os.path.join(directory, str(step))
  for item in ITEMS:
    item_dir = os.path.join(step_dir, item)
    try:
      files = _ckpt_files.item_files(item_dir)
    except _ckpt_files.FileDamage as d:
      return _file_damage(directory, step, item, names, d)
    bad = _ckpt_files.unreadable_chunk(item_dir, files, list(names.get(item, {})))
    if bad is not None:
      name, file, e = bad
      return damaged(step, directory, names[item][name], file,
                     f"its data cannot be decoded ({first_line(e)})")
  reason = (f"orbax could not read it ({first_line(error)})" if error else
            "another process could not read it")
  return damaged(step, directory, "an array", step_dir, reason)


def _located(directory, step, item, names, array, box, reason):
  """The error for ``array``, naming the files that hold ``box`` of it."""
  item_dir = os.path.join(directory, str(step), item)
  try:
    files = _ckpt_files.item_files(item_dir)
  except _ckpt_files.FileDamage as d:
    return _file_damage(directory, step, item, names, d)
  name = next((n for n, p in names[item].items() if p == array), None)
  where = (", ".join(_ckpt_files.files_of(files, name, box))
           if files is not None and name is not None else "") or item_dir
  return damaged(step, directory, array, where, reason)


def _file_damage(directory, step, item, names, d: _ckpt_files.FileDamage):
  arrays = [names.get(item, {}).get(n, f"{item}/{n}") for n in d.names]
  array = (", ".join(arrays[:3]) + (" ..." if len(arrays) > 3 else "")
           if arrays else f"every array of {item}")
  return damaged(step, directory, array, d.file, f"the file {d.reason}")


def _box(box) -> str:
  return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"
