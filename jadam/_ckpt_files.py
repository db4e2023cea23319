"""Which files of an orbax checkpoint item hold which array, and whether they
are all there: what names the file in a damaged checkpoint's error.

orbax writes each item (``params``, ``opt_state``) as one OCDBT database
(tensorstore's B+tree key-value store): ``manifest.ocdbt`` points at the
root node of a B+tree in ``d/…``; its leaves map the keys of every zarr
array (``<param name>/.zarray``, ``<param name>/<chunk>``) either to bytes
inline in the node or to a byte range of a data file
(``ocdbt.process_<i>/d/…``, one set per process). Manifests and nodes carry
their own CRC-32C (tensorstore checks it); the arrays' bytes carry none,
which is why jadam keeps checksums of its own (:mod:`jadam._checksum`).
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.parse
from typing import Any, NamedTuple

import tensorstore as ts


class FileDamage(Exception):
  """A file of a checkpoint item is missing, short or undecodable."""

  def __init__(self, file: str, reason: str, names=()):
    super().__init__(f"{file} {reason}")
    self.file = file
    self.reason = reason
    self.names = tuple(names)  # orbax param names with data in the file


class ItemFiles(NamedTuple):
  files: dict[str, dict[str, str]]  # param name -> chunk key -> file
  zarrays: dict[str, dict[str, Any]]  # param name -> zarr v2 metadata


def item_files(item_dir: str) -> ItemFiles | None:
  """The files of an item, checked: ``None`` when it is not an OCDBT item.

  Raises:
    FileDamage: a file the item needs is missing, shorter than the data it
      should hold, or fails its own checksum.
  """
  _check_json(os.path.join(item_dir, "_METADATA"))
  if not os.path.exists(os.path.join(item_dir, "manifest.ocdbt")):
    if os.path.exists(os.path.join(item_dir, "ocdbt.process_0")):
      raise FileDamage(os.path.join(item_dir, "manifest.ocdbt"), "is missing")
    return None
  kv = ts.KvStore.open({"driver": "file", "path": item_dir + "/"}).result()
  try:
    manifest = ts.ocdbt.dump(kv).result()
  except Exception as e:  # pylint: disable=broad-except
    raise FileDamage(os.path.join(item_dir, "manifest.ocdbt"),
                     f"cannot be decoded ({_first_line(e)})") from None
  out = ItemFiles({}, {})
  versions = manifest.get("versions") or []
  root = versions[-1]["root"].get("location") if versions else None
  if root is None:
    return out
  ends: dict[str, list[tuple[int, str]]] = {}  # file -> (value end, name)
  _walk(kv, item_dir, root, b"", out, ends)
  for file, values in sorted(ends.items()):
    _check_range(file, values)
  return out


def _walk(kv, item_dir, location, prefix, out: ItemFiles, ends) -> None:
  file, start, length = _parse(item_dir, location)
  _check_range(file, [(start + length, None)])
  try:
    node = ts.ocdbt.dump(kv, location).result()
  except Exception as e:  # pylint: disable=broad-except
    raise FileDamage(file, f"holds a B+tree node that cannot be decoded "
                     f"({_first_line(e)})") from None
  for entry in node["entries"]:
    if "location" in entry:  # interior: keys below are relative to a prefix
      _walk(kv, item_dir, entry["location"],
            prefix + entry["subtree_common_prefix"], out, ends)
      continue
    name, _, chunk = (prefix + entry["key"]).decode(errors="replace").partition("/")
    if "indirect_value" in entry:
      value_file, start, length = _parse(item_dir, entry["indirect_value"])
      ends.setdefault(value_file, []).append((start + length, name))
      out.files.setdefault(name, {})[chunk] = value_file
    else:
      out.files.setdefault(name, {})[chunk] = file
      if chunk == ".zarray":
        try:
          out.zarrays[name] = json.loads(entry["inline_value"])
        except ValueError:
          pass


def files_of(item: ItemFiles, name: str, box=None) -> list[str]:
  """The files holding array ``name``'s chunks that overlap ``box`` (a
  ``(start, stop)`` per dimension; all chunks when ``None`` or unknown)."""
  chunks = item.files.get(name, {})
  meta = item.zarrays.get(name)
  keys = [k for k in chunks if not k.startswith(".")]
  if box is not None and meta and len(meta.get("chunks", ())) == len(box):
    sep = meta.get("dimension_separator", ".")
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, meta["chunks"])]
    wanted = {sep.join(str(i) for i in cell) or "0"
              for cell in itertools.product(*ranges)}
    keys = [k for k in keys if k in wanted] or keys
  return sorted({chunks[k] for k in keys})


def unreadable_chunk(item_dir: str, item: ItemFiles | None, names):
  """The first ``(name, file, error)`` whose chunk tensorstore cannot read
  (decode), checking the arrays ``names`` in order; ``None`` if all read."""
  for name in names:
    meta = item.zarrays.get(name) if item else None
    if meta is None:
      continue
    spec = {"driver": "zarr",
            "kvstore": {"driver": "ocdbt",
                        "base": {"driver": "file", "path": item_dir + "/"},
                        "path": name + "/"}}
    try:
      store = ts.open(spec, open=True, read=True).result()
    except Exception as e:  # pylint: disable=broad-except
      return name, os.path.join(item_dir, "manifest.ocdbt"), e
    shape, chunk = meta["shape"], meta["chunks"]
    ranges = [range(0, n, c) for n, c in zip(shape, chunk)]
    for starts in itertools.product(*ranges):
      box = tuple(slice(a, min(a + c, n)) for a, c, n in zip(starts, chunk, shape))
      try:
        store[box].read().result()
      except Exception as e:  # pylint: disable=broad-except
        bounds = tuple((b.start, b.stop) for b in box)
        return name, ", ".join(files_of(item, name, bounds)), e
  return None


def _parse(item_dir: str, reference: str) -> tuple[str, int, int]:
  """``kind:base:relative:offset:length`` -> (file, offset, length)."""
  _, base, relative, offset, length = reference.rsplit(":", 4)
  path = urllib.parse.unquote(base) + urllib.parse.unquote(relative)
  return os.path.join(item_dir, path), int(offset), int(length)


def _check_range(file: str, values) -> None:
  """``values``: ``(end, array name or None)`` of what ``file`` holds."""
  try:
    size = os.path.getsize(file)
  except FileNotFoundError:
    raise FileDamage(file, "is missing",
                     sorted({n for _, n in values if n})) from None
  end = max(e for e, _ in values)
  if size < end:
    raise FileDamage(file, f"is truncated: {size} bytes, its data ends at "
                     f"byte {end}", sorted({n for e, n in values if n and e > size}))


def _check_json(file: str) -> None:
  try:
    with open(file, "rb") as f:
      json.load(f)
  except FileNotFoundError:
    raise FileDamage(file, "is missing") from None
  except ValueError as e:
    raise FileDamage(file, f"is not valid JSON ({e})") from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else type(e).__name__
  return line.split(" [tensorstore_spec")[0][:300]
