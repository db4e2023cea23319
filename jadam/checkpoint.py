"""Checkpoints of a data-parallel run that restore onto any device count and
detect damage.

:class:`Checkpointer` wraps orbax-checkpoint's ``CheckpointManager``: each
step is a directory with the params and the optimizer state (written by
tensorstore, shard by shard from the devices that hold them, so a ZeRO state
is never gathered) and a small JSON description of both (paths, shapes,
dtypes, checksums). Nothing is pickled.

Restoring goes *into a trainer*: the arrays land directly in that trainer's
mesh and layout (orbax reads each device's slice from the files), whatever
the device count that saved them. A ZeRO state restores onto another device
count because its buffers are padded to a multiple of 1024, which every
power-of-two count up to 1024 divides (other counts are re-padded). A
``"pmap"`` state holds one (identical) replica per device: onto another
device count, replica 0 is read and copied to every device.

A save is atomic: orbax writes into a temporary directory and renames it once
complete, so a process killed during a save leaves the previous checkpoints
as they were, and the half-written one is ignored.

Integrity (format version 2). The description holds a checksum of every
array, per cell of the grid of shards that saved it: a sum of 64-bit hashes
of (index in the whole array, bytes) of its elements, which any sharding can
compute shard by shard (:mod:`jadam._checksum`). At save each process hashes
the shards it holds (never gathering one), the processes add their sums in
one small all-gather, and process 0 writes them. A restore hashes what it
read, shard by shard on every process, over the saved grid, and compares:
the processes reach the same verdict. A damaged checkpoint raises
:class:`CheckpointCorruptError` naming the step, the array
(``opt_state[0].mu['w']``) and the file: altered bytes, a missing or
truncated file, or one that fails tensorstore's own checks (its manifests
and B+tree nodes carry CRC-32C). ``restore()`` without a step falls back to
the newest intact checkpoint with a warning naming what it skipped. Version
1 checkpoints (no checksums) still restore, without verification.

Saving a step that is not above every saved step raises a ``ValueError``
(orbax would drop it silently) unless ``overwrite=True``, which first
deletes the saved steps from that one on.

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

import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import _checksum
from . import _ckpt_files
from . import _ckpt_layout as L
from . import _ckpt_verify as V
from ._ckpt_verify import CheckpointCorruptError

__all__ = ["Checkpointer", "CheckpointCorruptError"]

FORMAT = "jadam.checkpoint"
VERSION = 2  # 2: with checksums; 1 (still read, not verified): without


def _reraise_naming(e: Exception, what: str):
  """Raises ``e`` with a message that names the checkpoint directory (an
  OSError keeps its type and errno)."""
  if isinstance(e, OSError) and e.errno is not None:
    raise type(e)(e.errno, f"{what}: {e.strerror}", e.filename) from e
  e.add_note(f"jadam.checkpoint: {what}")
  raise e


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
    self._interval = save_interval_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True,
        # What a killed save left behind is removed when a run restarts.
        cleanup_tmp_directories=True,
        # The step's directory is made inside `save`, so that a directory we
        # cannot write raises there. Made in the background, its failure
        # left orbax's writer threads waiting 20 minutes for it, and the
        # interpreter could not exit.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "layout": ocp.JsonCheckpointHandler()})

  # ------------------------------------------------------------------ saving

  def save(self, step: int, params, opt_state, *, force: bool = False,
           overwrite: bool = False) -> bool:
    """Starts saving ``params`` and ``opt_state`` as checkpoint ``step``.

    Asynchronous: it returns once the arrays are copied to host memory (they
    may then be donated to the next step) while the files are written in the
    background; :meth:`wait` waits for them. Each array's checksum is
    computed here, shard by shard. In a multi-process run every process
    calls it with its own shards.

    Args:
      step: the step number (an int, above every saved step).
      params: the params, in any trainer's layout.
      opt_state: the optimizer state, in the same trainer's layout.
      force: save even when ``step`` is not a multiple of
        ``save_interval_steps``.
      overwrite: when checkpoints of ``step`` or later steps exist, delete
        them first (a run that went back to an older checkpoint). Without
        it, that raises.

    Returns:
      Whether a save was started (False for a step off the save interval).

    Raises:
      ValueError: ``step`` is not above every saved step and ``overwrite``
        is False.
      OSError: the directory cannot be written (the message names it).
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"`Checkpointer.save(step=...)` must be a non-negative "
                       f"integer, got {step!r}")
    step = int(step)
    newer = [s for s in self._manager.all_steps() if s >= step]
    if newer and (force or step % self._interval == 0
                  or self._manager.reached_preemption(step)):
      if not overwrite:
        what = (f"a checkpoint of step {step}" if newer == [step] else
                f"checkpoints of steps {sorted(newer)}")
        raise ValueError(
            f"`Checkpointer.save(step={step})`: {self.directory} already has "
            f"{what}; steps must increase (orbax would drop this save). Pass "
            f"`overwrite=True` to delete {sorted(newer)} and save this one, "
            f"or save under a step above {max(newer)}")
      self._manager.wait_until_finished()
      for s in sorted(newer):
        self._manager.delete(s)
    if not force and not self._manager.should_save(step):
      return False  # off the save interval: no checksums to compute
    described = V.describe_with_checksums(params, opt_state)
    layout = {
        "format": FORMAT, "version": VERSION, "step": step,
        "checksum": _checksum.ALGORITHM,
        "params": described[0], "opt_state": described[1],
    }
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        layout=ocp.args.JsonSave(layout))
    try:
      return bool(self._manager.save(step, args=args, force=force))
    except OSError as e:
      _reraise_naming(e, f"cannot write checkpoint step {step} into "
                      f"{self.directory}")

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      _reraise_naming(e, f"writing a checkpoint into {self.directory} "
                      "failed (that step was not saved)")

  # ----------------------------------------------------------------- reading

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None`` (complete: not
    checked for damage; :meth:`restore` checks)."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def restore(self, trainer, step: int | None = None, *, like=None):
    """Restores a checkpoint into ``trainer``'s mesh and layout, verified.

    Args:
      trainer: a ``jadam.parallel.DataParallel``; its device count may differ
        from the run that saved (its strategy's layout may not: a ZeRO state
        restores into a ZeRO trainer, a replicated one into a replicated one).
      step: the step to restore (default: the newest intact one).
      like: the params' structure, shapes and dtypes (arrays or
        ``jax.ShapeDtypeStruct``; a ``NamedSharding`` counts for model-
        parallel params). Default: those of ``trainer.init``'s last params,
        else the checkpoint's own (dicts and lists).

    Returns:
      ``(step, params, opt_state)``, ready for ``trainer.step``.

    Raises:
      FileNotFoundError: when there is no (such) checkpoint.
      CheckpointCorruptError: when ``step``'s checkpoint (or, without
        ``step``, every checkpoint) is damaged; the message names the step,
        the array and the file. Without ``step``, each damaged newer
        checkpoint is skipped with a warning.
      ValueError: when the checkpoint was saved for other params or another
        optimizer state layout; the message names the first difference.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = sorted(self._manager.all_steps())
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {self.directory}; there are "
            f"{steps}")
      return self._restore(trainer, step, like)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damaged = []
    for i, s in enumerate(reversed(steps)):
      try:
        return self._restore(trainer, s, like)
      except CheckpointCorruptError as e:
        damaged.append(e)
        then = (f"trying step {steps[-2 - i]}" if i + 1 < len(steps) else
                "no older step is left")
        warnings.warn(f"{e}; skipping step {s}, {then}", stacklevel=2)
    raise CheckpointCorruptError(
        f"no intact checkpoint in {self.directory}: "
        + "; ".join(f"step {e.step}: {e.array}: {e.file}" for e in damaged),
        file=self.directory)

  def _restore(self, trainer, step: int, like):
    step_dir = os.path.join(self.directory, str(step))
    where = f"checkpoint {step_dir}"
    try:
      saved = self._manager.restore(
          step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
    except Exception as e:  # pylint: disable=broad-except
      raise V.damaged(step, self.directory, "the description",
                     os.path.join(step_dir, "layout", "metadata"),
                     f"it cannot be read ({V.first_line(e)})") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
      raise ValueError(f"{where} was not written by jadam.checkpoint")
    if saved.get("version") not in (1, 2):
      raise ValueError(f"{where} has format version {saved.get('version')!r}; "
                       f"this jadam reads versions 1 and 2")

    if like is None:
      like = trainer.params_template
    if like is None:
      try:
        like = self._saved_params(step)
      except Exception as e:  # pylint: disable=broad-except
        raise V.diagnose(self.directory, step, {}, e) from e
      if trainer.strategy == "pmap":  # saved with pmap's leading device axis
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), like)
    target_params, target_state = trainer.abstract_state(like)
    replicas = L.pmap_replicas(trainer, saved)
    # A pmap state of another device count compares as if saved on this one.
    seen = {item: [{**x, "shape": [trainer.num_devices, *x["shape"][1:]]}
                   if replicas else x for x in saved[item]] for item in L.ITEMS}
    L.compare("params", where, seen["params"], L.describe(target_params))
    flat_paths = L.flat_buffer_paths(target_state)
    try:
      resized = L.compare("optimizer state", where, seen["opt_state"],
                         L.describe(target_state),
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
      if replicas:  # replica 0 only, on every device
        return jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype,
                                    sharding=NamedSharding(x.sharding.mesh, P()))
      s = resized_paths.get(L.keystr(path))
      if s is None:
        return x
      return jax.ShapeDtypeStruct(tuple(s["shape"]), x.dtype,
                                  sharding=L.sharding_for(x.sharding, s["shape"]))

    read = {"params": jax.tree_util.tree_map_with_path(read_target, target_params),
            "opt_state": jax.tree_util.tree_map_with_path(read_target, target_state)}
    names = {item: V.param_names(read[item], item) for item in L.ITEMS}
    try:
      # Missing or short files, found from the index before orbax reads.
      for item in L.ITEMS:
        _ckpt_files.item_files(os.path.join(self.directory, str(step), item))
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          item: ocp.args.StandardRestore(read[item], strict=not replicas)
          for item in L.ITEMS}))
      error = None
    except (jax.errors.JaxRuntimeError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      restored, error = None, e
    V.verify(self.directory, step, saved, restored, names, error, replicas)

    params, opt_state = restored["params"], restored["opt_state"]
    if replicas:
      params, opt_state = L.broadcast((params, opt_state),
                                     (target_params, target_state))
    elif resized_paths:
      opt_state = L.repad(opt_state, target_state)
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


