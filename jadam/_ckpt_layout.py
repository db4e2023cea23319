"""The JSON description of a checkpoint (paths, shapes, dtypes), its
comparison with a trainer's layout, and the re-layouts a restore onto another
device count needs (jadam.checkpoint's helpers)."""

from __future__ import annotations

import collections.abc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ._optax_state import MasterState

ITEMS = ("params", "opt_state")


def keystr(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def describe(tree) -> list[dict[str, Any]]:
  """Path, shape and dtype of every leaf (JSON-able)."""
  return [{"path": keystr(path), "shape": list(np.shape(x)),
           "dtype": np.dtype(x.dtype).name}
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def fmt(leaf: dict) -> str:
  return f"{tuple(leaf['shape'])} {leaf['dtype']}"


def compare(what: str, where: str, saved: list[dict], wanted: list[dict],
             *, resizable=lambda path: False) -> list[tuple[dict, dict]]:
  """Raises a ValueError naming the first difference between two leaf lists.

  Returns the pairs whose shapes differ only in one (padded) dimension of a
  resizable leaf: a packed buffer's length, or a quantized buffer's number
  of blocks.
  """
  by_path = {x["path"]: x for x in saved}
  wanted_paths = {x["path"] for x in wanted}
  resized = []
  for w in wanted:
    s = by_path.get(w["path"])
    if s is None:
      only = [x["path"] for x in saved if x["path"] not in wanted_paths]
      raise ValueError(
          f"{where} does not match the {what}: {w['path']} ({fmt(w)}) is not "
          f"in the checkpoint" + (f", which has {', '.join(only[:4])}"
                                  f"{' ...' if len(only) > 4 else ''} instead"
                                  if only else ""))
    if s["dtype"] != w["dtype"]:
      raise ValueError(
          f"{where} does not match the {what}: {w['path']} is {fmt(s)} in the "
          f"checkpoint, {fmt(w)} here")
    if s["shape"] != w["shape"]:
      if (resizable(w["path"]) and len(s["shape"]) == len(w["shape"])
          and sum(a != b for a, b in zip(s["shape"], w["shape"])) == 1):
        resized.append((s, w))
        continue
      raise ValueError(
          f"{where} does not match the {what}: {w['path']} is {fmt(s)} in the "
          f"checkpoint, {fmt(w)} here")
  extra = [x["path"] for x in saved if x["path"] not in wanted_paths]
  if extra:
    raise ValueError(
        f"{where} does not match the {what}: the checkpoint also has "
        f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}, which the "
        f"{what} lack")
  return resized


def flat_buffer_paths(state) -> set[str]:
  """Paths of packed moment buffers (the :class:`jadam.Packed` moments of a
  jadam or optax Adam state, and packed master weights): their padded length
  may differ."""
  def moments(x):
    return hasattr(x, "_fields") and "mu" in x._fields

  def master(x):
    return isinstance(x, MasterState)

  return (_packed_paths(state, moments, ("mu", "nu", "nu_max"))
          | _packed_paths(state, master, ("master",)))


def _packed_paths(state, is_node, names) -> set[str]:
  out = set()
  for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_node)[0]:
    if not is_node(node):
      continue
    prefix = jax.tree_util.keystr(path)
    for name in (n for n in names if n in node._fields):
      moment = getattr(node, name)
      if isinstance(moment, collections.abc.Mapping):
        for sub, _ in jax.tree_util.tree_leaves_with_path(moment):
          out.add(f"{prefix}.{name}{jax.tree_util.keystr(sub)}")
  return out


def pmap_replicas(trainer, saved) -> bool:
  """Whether a ``"pmap"`` checkpoint (one replica per device, on a leading
  axis) is restored onto another device count."""
  if trainer.strategy != "pmap" or not saved["params"]:
    return False
  n = saved["params"][0]["shape"][:1]
  return (n != [trainer.num_devices]
          and all(x["shape"][:1] == n for item in ITEMS for x in saved[item]))


def broadcast(tree, target):
  """Replica 0 (a leading axis of 1) copied to every device of ``target``."""
  return jax.jit(
      lambda t: jax.tree.map(lambda x, s: jnp.broadcast_to(x, s.shape), t, target),
      out_shardings=jax.tree.map(lambda s: s.sharding, target))(tree)


def sharding_for(sharding: NamedSharding, shape) -> NamedSharding:
  """``sharding`` with every dimension it does not divide replicated."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, entry in enumerate(spec):
    if entry is None:
      continue
    names = entry if isinstance(entry, tuple) else (entry,)
    n = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if shape[dim] % n:
      spec[dim] = None
  return NamedSharding(sharding.mesh, P(*spec))


def repad(state, target):
  # The one padded dimension is cut or zero extended: padding elements (and
  # a quantized buffer's padding blocks: zero codes, zero scales) hold nothing.
  def fix(x, t):
    if tuple(x.shape) == tuple(t.shape):
      return x
    dim = next(i for i, (a, b) in enumerate(zip(x.shape, t.shape)) if a != b)
    n = t.shape[dim]
    if x.shape[dim] >= n:
      return jax.lax.slice_in_dim(x, 0, n, axis=dim)
    pad = [(0, 0)] * x.ndim
    pad[dim] = (0, n - x.shape[dim])
    return jnp.pad(x, pad)

  return jax.jit(lambda s: jax.tree.map(fix, s, target),
                 out_shardings=jax.tree.map(lambda t: t.sharding, target))(state)
