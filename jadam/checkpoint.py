"""Checkpoints of a data-parallel run that restore onto any device count.

:class:`Checkpointer` wraps orbax-checkpoint's ``CheckpointManager``: each
step is a directory with the params and the optimizer state (written by
tensorstore, shard by shard from the devices that hold them, so a ZeRO state
is never gathered) and a small JSON description of both (paths, shapes,
dtypes). Nothing is pickled.

Restoring goes *into a trainer*: the arrays land directly in that trainer's
mesh and layout (orbax reads each device's slice from the files), whatever
the device count that saved them. A ZeRO state restores onto another device
count because its buffers are padded to a multiple of 1024, which every
power-of-two count up to 1024 divides (other counts are re-padded).

A save is atomic: orbax writes into a temporary directory and renames it once
complete, so a process killed during a save leaves the previous checkpoints
as they were, and the half-written one is ignored.

Example::

  ckpt = jadam.checkpoint.Checkpointer("/tmp/run", max_to_keep=3)
  params, opt_state = trainer.init(params)
  if ckpt.latest_step() is not None:
    step, params, opt_state = ckpt.restore(trainer)
  ...
  ckpt.save(step, params, opt_state)  # returns once the arrays are copied
  ...
  ckpt.wait()
"""

from __future__ import annotations

import collections.abc
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ._optax_state import MasterState

__all__ = ["Checkpointer"]

FORMAT = "jadam.checkpoint"
VERSION = 1


def _keystr(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _describe(tree) -> list[dict[str, Any]]:
  """Path, shape and dtype of every leaf (JSON-able)."""
  return [{"path": _keystr(path), "shape": list(np.shape(x)),
           "dtype": np.dtype(x.dtype).name}
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _fmt(leaf: dict) -> str:
  return f"{tuple(leaf['shape'])} {leaf['dtype']}"


def _compare(what: str, where: str, saved: list[dict], wanted: list[dict],
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
          f"{where} does not match the {what}: {w['path']} ({_fmt(w)}) is not "
          f"in the checkpoint" + (f", which has {', '.join(only[:4])}"
                                  f"{' ...' if len(only) > 4 else ''} instead"
                                  if only else ""))
    if s["dtype"] != w["dtype"]:
      raise ValueError(
          f"{where} does not match the {what}: {w['path']} is {_fmt(s)} in the "
          f"checkpoint, {_fmt(w)} here")
    if s["shape"] != w["shape"]:
      if (resizable(w["path"]) and len(s["shape"]) == len(w["shape"])
          and sum(a != b for a, b in zip(s["shape"], w["shape"])) == 1):
        resized.append((s, w))
        continue
      raise ValueError(
          f"{where} does not match the {what}: {w['path']} is {_fmt(s)} in the "
          f"checkpoint, {_fmt(w)} here")
  extra = [x["path"] for x in saved if x["path"] not in wanted_paths]
  if extra:
    raise ValueError(
        f"{where} does not match the {what}: the checkpoint also has "
        f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}, which the "
        f"{what} lack")
  return resized


def _flat_buffer_paths(state) -> set[str]:
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


class Checkpointer:
  """Saves and restores ``(step, params, opt_state)`` of a data-parallel run.

  Args:
    directory: where the checkpoints live (one subdirectory per step);
      created if missing.
    max_to_keep: keep only the newest this many checkpoints (``None``: all).
    save_interval_steps: save only steps that are multiples of this
      (other ``save`` calls return False).
    async_save: write in a background thread (default); ``save`` returns
      once the arrays are copied off the devices, so the next step may
      donate them.

  Example:
    >>> import tempfile, jax, numpy as np, jax.numpy as jnp, jadam, jadam.parallel
    >>> import jadam.checkpoint
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
    >>> trainer = jadam.parallel.DataParallel(loss, jadam.adam(1e-3), mesh)
    >>> params, state = trainer.init({"w": np.ones((4, 2), np.float32)})
    >>> ckpt = jadam.checkpoint.Checkpointer(tempfile.mkdtemp(), max_to_keep=2)
    >>> ckpt.save(0, params, state)
    True
    >>> ckpt.wait()
    >>> step, params, state = ckpt.restore(trainer)
    >>> step
    0
  """

  def __init__(self, directory, max_to_keep: int | None = None, *,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(
        max_to_keep, int) or max_to_keep < 1):
      raise ValueError("`Checkpointer(max_to_keep=...)` must be None or a "
                       f"positive integer, got {max_to_keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True,
        # What a killed save left behind is removed when a run restarts.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "layout": ocp.JsonCheckpointHandler()})

  # ------------------------------------------------------------------ saving

  def save(self, step: int, params, opt_state, *, force: bool = False) -> bool:
    """Starts saving ``params`` and ``opt_state`` as checkpoint ``step``.

    Asynchronous: it returns once the arrays are copied to host memory (they
    may then be donated to the next step) while the files are written in the
    background; :meth:`wait` waits for them. In a multi-process run every
    process calls it with its own shards.

    Args:
      step: the step number (an int, unique).
      params: the params, in any trainer's layout.
      opt_state: the optimizer state, in the same trainer's layout.
      force: save even when ``step`` is not a multiple of
        ``save_interval_steps``.

    Returns:
      Whether a save was started.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"`Checkpointer.save(step=...)` must be a non-negative "
                       f"integer, got {step!r}")
    layout = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "params": _describe(params), "opt_state": _describe(opt_state),
    }
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        layout=ocp.args.JsonSave(layout))
    return bool(self._manager.save(int(step), args=args, force=force))

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  # ----------------------------------------------------------------- reading

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def restore(self, trainer, step: int | None = None, *, like=None):
    """Restores a checkpoint into ``trainer``'s mesh and layout.

    Args:
      trainer: a ``jadam.parallel.DataParallel``; its device count may differ
        from the run that saved (its strategy's layout may not: a ZeRO state
        restores into a ZeRO trainer, a replicated one into a replicated one).
      step: the step to restore (default: the latest).
      like: the params' structure, shapes and dtypes (arrays or
        ``jax.ShapeDtypeStruct``; a ``NamedSharding`` counts for model-
        parallel params). Default: those of ``trainer.init``'s last params,
        else the checkpoint's own (dicts and lists).

    Returns:
      ``(step, params, opt_state)``, ready for ``trainer.step``.

    Raises:
      FileNotFoundError: when there is no (such) checkpoint.
      ValueError: when the checkpoint was saved for other params or another
        optimizer state layout; the message names the first difference.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint of step {step} in {self.directory}; there are "
          f"{sorted(self._manager.all_steps())}")
    where = f"checkpoint {os.path.join(self.directory, str(step))}"
    saved = self._manager.restore(
        step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
      raise ValueError(f"{where} was not written by jadam.checkpoint")

    if like is None:
      like = trainer.params_template
    if like is None:
      like = self._saved_params(step)
      if trainer.strategy == "pmap":  # saved with pmap's leading device axis
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), like)
    target_params, target_state = trainer.abstract_state(like)
    _compare("params", where, saved["params"], _describe(target_params))
    flat_paths = _flat_buffer_paths(target_state)
    try:
      resized = _compare("optimizer state", where, saved["opt_state"],
                         _describe(target_state),
                         resizable=lambda path: path in flat_paths)
    except ValueError as e:
      raise ValueError(
          f"{e} (the trainer's strategy is {trainer.strategy!r}; a ZeRO "
          "state restores only into 'zero1'/'zero2' trainers, a replicated "
          "one only into 'shard_map'/'jit')") from None

    # Packed buffers padded for another device count: read them at their
    # saved length, then re-pad (the padding holds nothing).
    resized_paths = {w["path"]: s for s, w in resized}

    def read_target(path, x):
      s = resized_paths.get(_keystr(path))
      if s is None:
        return x
      return jax.ShapeDtypeStruct(tuple(s["shape"]), x.dtype,
                                  sharding=_sharding_for(x.sharding, s["shape"]))

    read_state = jax.tree_util.tree_map_with_path(read_target, target_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target_params),
        opt_state=ocp.args.StandardRestore(read_state)))
    params, opt_state = restored["params"], restored["opt_state"]
    if resized_paths:
      opt_state = _repad(opt_state, target_state)
    return int(step), params, opt_state

  def _saved_params(self, step: int):
    metadata = self._manager.item_metadata(step)["params"]
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                        tree)

  # --------------------------------------------------------------- lifetime

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"Checkpointer({self.directory!r})"


def _sharding_for(sharding: NamedSharding, shape) -> NamedSharding:
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


def _repad(state, target):
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
