"""Which path runs a step: the kernel (on one device's arrays or, under
GSPMD, on each device's shards) or XLA's ops; ``kernel="auto"``'s policy and
what the kernel cannot run (see :mod:`jadam._kernel`)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import _quant
from .. import _rule
from .. import _segments
from .. import _update
from .._sharding import explicit_sharding
from . import _ffi

MODES = ("auto", "xla", "fused")
ENV = "JADAM_KERNEL"
ENV_VALUES = ("inplace", "xla", "fused")
AUTO = "inplace"
"""What ``kernel="auto"`` runs unless ``$JADAM_KERNEL`` says otherwise:

* ``"inplace"`` (default): the kernel for steps that apply the update in
  place (``jadam.step``, on tree or packed params), where it is measured
  faster (BENCHMARKS.md); XLA's ops for the updates that the optax drop-in
  (``jadam.adam(...).update``) returns, where the kernel writes the update
  over the gradient, which XLA's fused ``p + u`` does not need (level with
  XLA in a train step, about 2x slower on a gradient passed in, which XLA
  copies first), and which stay bit-identical to optax; but the kernel for
  those too when a
  moment is quantized (q8: XLA's decode and encode make that step about 2x
  slower than the kernel's, and no quantized step is optax's bits anyway)
  or the master weights are ``"q8"`` (XLA's ``frexp`` and ``ldexp`` of every
  param: 1.7x slower; ``benchmarks/master_kernel.py``); and for the
  ``layout="flat"`` optimizer's buffers of several leaves, which it steps
  without packing the gradients or unpacking the updates
  (:mod:`jadam._kernel._leafwise`);
* ``"fused"``: the kernel wherever it can run;
* ``"xla"``: never.

Under ``"auto"`` a step on arrays of a GSPMD mesh with more than one device
(the context mesh of ``jax.set_mesh``, or arrays placed on such a mesh) runs
the kernel on each device's shards where its partitioning rule can
(:func:`unpartitionable`), else XLA's ops (the kernel would gather its
operands). Inside ``shard_map`` and ``pmap`` the arrays are local: the kernel
runs there as on one device."""

_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def effective_rule(rule: _rule.Rule) -> _rule.Rule:
  """``rule`` with ``kernel="auto"`` resolved by ``$JADAM_KERNEL`` (:data:`AUTO`):
  ``"xla"``, ``"auto"`` (the kernel for in-place steps) or
  :data:`jadam._rule.AUTO_ANYWHERE`. Called before a step is traced, so the
  choice is part of the jit's cache key."""
  if rule.kernel != "auto":
    return rule
  mode = auto_mode()
  if mode == "inplace":
    return rule
  return dataclasses.replace(rule, kernel="xla" if mode == "xla" else _rule.AUTO_ANYWHERE)


def auto_mode() -> str:
  """What ``kernel="auto"`` means now: ``"inplace"``, ``"xla"`` or ``"fused"``."""
  mode = os.environ.get(ENV) or AUTO
  if mode not in ENV_VALUES:
    raise ValueError(f"${ENV} must be one of {ENV_VALUES}, got {mode!r}")
  return mode


def use_kernel(rule: _rule.Rule, hp: _rule.Hyper, chunks, apply, for_mesh,
                use_wd: bool) -> bool | str:
  """Whether the kernel runs this step: False, True, or ``"partition"`` (on
  each device's shards under GSPMD, :mod:`jadam._kernel._partition`)."""
  mode = rule.kernel
  if mode == "auto":  # not resolved by effective_rule: read the environment now
    mode = effective_rule(rule).kernel
  if mode == "xla" or not chunks:
    return False
  if mode == "auto" and apply is None and not quantized(chunks) and rule.master != "q8":
    return False  # updates returned to the caller: XLA fuses them into p + u
  why = "a flat layout packed for a mesh" if for_mesh else unsupported(rule, hp, chunks, apply)
  if why is None and on_gspmd_mesh(chunks):
    if unpartitionable(rule, chunks, use_wd) is None and _ffi.available():
      return "partition"
    if mode != "fused":
      return False  # the kernel would gather its operands: XLA's ops
  if why is None and not _ffi.available():
    return False  # a notice was logged
  if why is not None and mode == "fused":
    raise ValueError(f"kernel='fused' cannot run this step: {why} (use kernel='auto', "
                     "which runs such steps as XLA ops)")
  return why is None


def unpartitionable(rule: _rule.Rule, chunks, use_wd: bool) -> str | None:
  """Why the kernel cannot run on each device's shards under GSPMD (it then
  runs on gathered operands), or None."""
  if rule.trust_ratio:
    return "LAMB (a norm over each whole leaf)"
  if quantized(chunks):
    return "quantized moments (a block, or a rank-1 tensor's maxima, spans shards)"
  for c in chunks:
    n = int(np.prod(c.grad.shape))
    if decay_ranges(c, use_wd) not in ([], [(0, n)]):
      return "a weight decay mask within a leaf"
  return None


def quantized(chunks) -> bool:
  return any(isinstance(m, _quant.QArray) for c in chunks for m in c.moments)


def on_gspmd_mesh(chunks) -> bool:
  """Whether the step's arrays may be split by GSPMD: a context mesh (or a
  mesh in an array's type) with more than one device on axes that are not
  manual (``shard_map``'s are)."""
  meshes = [jax.sharding.get_abstract_mesh()]
  for c in chunks:
    for x in arrays(c):
      meshes.append(getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None))
  for mesh in filter(None, meshes):
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    if any(size > 1 and name not in manual for name, size in mesh.shape.items()):
      return True
  return False


def arrays(chunk) -> list:
  """The arrays of a chunk: gradient, param and moments (a quantized
  moment's codes and scales)."""
  return jax.tree.leaves((chunk.grad, chunk.param, tuple(chunk.moments)))


def unsupported(rule: _rule.Rule, hp: _rule.Hyper, chunks, apply) -> str | None:
  """Why the kernel cannot run this step, or None if it can."""
  if jax.default_backend() != "cpu":
    return f"it runs on CPU only, not {jax.default_backend()}"
  if rule.master and rule.trust_ratio:
    return "LAMB with master weights"
  if rule.trust_ratio and rule.skip_nonfinite:
    return "LAMB with skip_nonfinite"
  if apply not in (None, "fused"):
    return f"apply={apply!r}"
  for k, v in hp._asdict().items():
    if v is not None and not isinstance(v, (int, float)) and jnp.result_type(v) != np.float32:
      return f"hyperparameter {k} of dtype {jnp.result_type(v)} (float32 only)"
  for c in chunks:
    if not isinstance(c.segments, (type(_segments.WHOLE), _segments.BufferSegments)):
      # Slices of packed buffers (ZeRO): where a leaf starts depends on the
      # device, so per-leaf norms and masks are not static offsets.
      if rule.trust_ratio:
        return f"LAMB on chunks split by {type(c.segments).__name__}"
      if _update.uses_weight_decay(hp) and len(set(c.decay)) > 1:
        return f"a weight decay mask within chunks split by {type(c.segments).__name__}"

    for m in c.moments:
      if isinstance(m, _quant.QArray) and m.rank1 and len(m.view) > 8:
        return "rank-1 quantized moments of more than 8 dimensions"
    # (A quantized moment's codes are uint8; master weights' state, float32 or int8.)
    for x in arrays(c._replace(moments=c.moments[:-1]) if rule.master else c):
      if x.dtype != np.uint8 and np.dtype(x.dtype) not in _DTYPES:
        return f"dtype {x.dtype} (float32, bfloat16 and float16 only)"
    if any(explicit_sharding(x) is not None for x in arrays(c)):
      return "arrays of an Explicit mesh"
  return None


def decay_ranges(chunk, use_wd: bool) -> list[tuple[int, int]]:
  """The element ranges of ``chunk`` where weight decay applies."""
  n = int(np.prod(chunk.grad.shape))
  if not use_wd or not n:
    return []
  if chunk.segments is _segments.WHOLE:
    return [(0, n)] if chunk.decay[0] else []
  flags = tuple(chunk.decay)
  if all(flags):  # the padding is zero: decaying it changes nothing
    return [(0, n)]
  if not any(flags):
    return []
  ranges, at = [], 0
  for size, flag in zip(chunk.segments.sizes, flags + (False,)):
    if flag and size:
      if ranges and ranges[-1][1] == at:
        ranges[-1] = (ranges[-1][0], at + size)
      else:
        ranges.append((at, at + size))
    at += size
  return ranges
