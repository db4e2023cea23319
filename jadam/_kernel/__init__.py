"""The fused multi-tensor Adam kernel for XLA:CPU, behind one hook for the layouts.

The tree and flat layouts and ZeRO call :func:`update_and_finish` with their
chunks: it is :func:`jadam._update.apply_chunks` followed by
:func:`jadam._update.finish` on every chunk, run either as XLA ops (a few
loops per chunk) or as one call of a C++ kernel (``adam_kernel.cc``, through
``jax.ffi``) that updates all the chunks in one pass each: 28 bytes per
float32 parameter for ``jadam.step``, moments (and params) in place, split
over the CPU's cores, and a compile time that no longer grows with the number
of leaves. The same float32 operations in the same order, to float32 rounding
(below).

Which path runs (``kernel=`` of every optimizer, :attr:`jadam._rule.Rule.kernel`):

* ``"fused"``: the kernel, or a ``ValueError`` saying why it cannot run this
  step. It runs every rule (Adam, NAdam, AMSGrad, Adamax, RAdam, decoupled
  weight decay with masks, LAMB, ``skip_nonfinite`` except with LAMB) with
  float32, bfloat16 or float16 params, gradients and moments, on CPU, in the
  tree and flat layouts and on ZeRO's slices (``zero1``/``zero2``, inside
  their ``shard_map``; not LAMB or a weight decay mask there: where a leaf
  starts in a slice depends on the device), and with block-wise quantized
  moments (``q8``, and ``q4``'s ``mu``: decoded, updated and encoded in the
  same pass, ``adam_quant.h``), rank-1 quantized moments (``q4``'s ``nu``
  on a tensor, or at the start of its packed buffer: a first pass computes
  the tensor's new maxima, ``adam_rank1.h``), and master weights (``"float32"`` or ``"q8"``:
  the master value decoded, updated and rounded to the param in the same
  pass, ``adam_master.h``), and 1-bit Adam's frozen ``nu``; for the flat
  layout's tree-in/tree-out form, on the gradient and update leaves with the
  moments at their offsets in the packed buffers (:mod:`._leafwise`: float
  moments, not LAMB or master weights); on arrays that
  GSPMD splits over a mesh, on each device's shards
  (:mod:`jadam._kernel._partition`: not LAMB or block-wise quantized moments
  there, whose operands are gathered instead). Not: LAMB with master weights (its trust ratio needs the
  master values' norms), complex or float64 values, arrays of an
  ``Explicit`` mesh, a flat layout packed for a mesh.
* ``"xla"``: always the XLA ops.
* ``"auto"`` (default): what :data:`AUTO` says (the kernel for in-place steps,
  ``jadam.step``, and for steps with quantized moments or q8 master
  weights), or ``$JADAM_KERNEL``
  (read when a step is traced); where the kernel cannot run, the XLA ops,
  without an error.

The kernel computes every operation of the rule rounded to float32, in the
rule's order: bit for bit what NumPy computes in float32
(``tests/_np_adam.py``, ``tests/test_kernel.py``). XLA's ops cannot promise
that: XLA:CPU contracts multiply-adds into FMAs (LLVM may fuse either
product of ``a*b + c*d``) and rewrites divisions (``x / b`` into ``x * (1/b)``,
``(x / b) / c`` into ``x / (b * c)``), differently in different programs: the
same leaf's optax update differs in its last bits between a one-leaf and a
two-leaf tree, and ``mu`` is ``fma(1-b1, g, b1*mu)`` in one program and
``fma(b1, mu, (1-b1)*g)`` in a ``lax.scan`` of the same step. So no fixed
kernel is bit-identical to XLA's ops in every program; the kernel agrees
with them, and with optax, to float32 rounding.

Where the kernel cannot be built (no C++ compiler, no FFI) every mode runs the
XLA ops after one logged notice. Under ``jax.vmap`` and in derivatives
(``jax.grad``/``jvp`` through the step) the kernel steps aside for the XLA ops
(a ``custom_vmap`` and a ``custom_jvp``): it has no rule of its own there.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import _rule
from .. import _segments
from .. import _update
from . import _ffi
from ._leafwise import keys as leafwise_keys
from ._leafwise import update as leafwise_update
# Which path runs: re-exported for the layouts and tests.
from ._policy import AUTO as AUTO
from ._policy import ENV as ENV
from ._policy import ENV_VALUES as ENV_VALUES
from ._policy import MODES as MODES
from ._policy import auto_mode as auto_mode
from ._policy import decay_ranges
from ._policy import effective_rule as effective_rule
from ._policy import on_gspmd_mesh as on_gspmd_mesh
from ._policy import unpartitionable as unpartitionable
from ._policy import unsupported as unsupported
from ._policy import use_kernel

GROUP = int(os.environ.get("JADAM_KERNEL_GROUP", 64))
"""Leaves per kernel call."""


def available() -> bool:
  """Whether the kernel is built and registered (it is built on first use)."""
  return _ffi.available()


def update_and_finish(rule: _rule.Rule, hp: _rule.Hyper, count: jax.Array, chunks, *,
                      use_wd: bool, scale_lr: bool, apply: str | None, out_dtypes,
                      for_mesh: bool = False, finite=None):
  """One step over ``chunks``, each result finished.

  Args:
    rule: the static rule.
    hp: hyperparameter values at this step (from :func:`jadam._update.merge_hyper`).
    count: the state's step count before this step.
    chunks, use_wd, scale_lr: as :func:`jadam._update.apply_chunks`.
    apply: as :func:`jadam._update.finish` (``None`` or ``"fused"``).
    out_dtypes: per chunk, the dtype of its updates (without ``apply``).
    for_mesh: the chunks are buffers packed to be split over a mesh (the
      kernel would gather them: the XLA ops run).
    finite: as :func:`jadam._update.apply_chunks` (a flag reduced over the
      devices by a caller that holds a slice of the gradient).

  Returns:
    ``(new_count, [(result, new_moments) per chunk], finite)``: each result is
    ``finish(update, chunk.param, out_dtype, apply)``; after a skipped step
    ``new_count`` is ``count``.
  """
  hp, count_inc, scalars = _update.step_inputs(rule, hp, count)
  hp_static, hp_arrays = _update.array_hyper(hp)
  static = _Static(rule, hp_static, chunks, use_wd, scale_lr, apply, tuple(out_dtypes))
  dyn = (hp_arrays, scalars,
         [(c.grad, tuple(c.moments), c.param) for c in chunks], finite)
  use = use_kernel(rule, hp, chunks, apply, for_mesh, use_wd)
  static.partition = use == "partition"
  fn = _fused_with_fallbacks(static) if use else static.xla
  results, finite = fn(dyn)
  return _update.next_count(count, count_inc, finite), results, finite

def _fused_with_fallbacks(static: "_Static"):
  """The kernel call, with XLA's ops under ``vmap`` and in derivatives."""
  batched = jax.custom_batching.custom_vmap(static.kernel)

  @batched.def_vmap
  def _vmap(axis_size, in_batched, dyn):
    del axis_size
    axes = jax.tree.map(lambda b: 0 if b else None, in_batched[0])
    out = jax.vmap(static.xla, in_axes=(axes,))(dyn)
    return out, jax.tree.map(lambda _: True, out)

  fn = jax.custom_jvp(batched)
  fn.defjvp(lambda primals, tangents: jax.jvp(static.xla, primals, tangents))
  return fn


class _Static:
  """Everything of a step but its arrays: the two ways to run it."""

  def __init__(self, rule, hp_static, chunks, use_wd, scale_lr, apply, out_dtypes):
    self.partition = False  # the kernel on each device's shards (set by update_and_finish)
    self.rule, self.use_wd, self.scale_lr = rule, use_wd, scale_lr
    self.apply, self.out_dtypes = apply, out_dtypes
    self.hp_static = hp_static  # (the arrays are operands: _update.array_hyper)
    self.segments = [(c.segments, c.decay) for c in chunks]

  def _unpack(self, dyn):
    hp_dyn, scalars, arrays, finite = dyn
    hp = self.hp_static._replace(**hp_dyn)
    chunks = [_update.Chunk(g, moments, p, seg, decay)
              for (g, moments, p), (seg, decay) in zip(arrays, self.segments)]
    return hp, scalars, chunks, finite

  def xla(self, dyn):
    """The XLA ops: :func:`jadam._update.apply_chunks`, then finish."""
    hp, scalars, chunks, finite = self._unpack(dyn)
    results, finite = _update.apply_chunks(self.rule, hp, scalars, chunks, use_wd=self.use_wd,
                                           scale_lr=self.scale_lr, finite=finite)
    return [(_update.finish(u, c.param, dtype, self.apply), m)
            for (u, m), c, dtype in zip(results, chunks, self.out_dtypes)], finite

  def kernel(self, dyn):
    """The same step as one kernel call (two with LAMB's trust ratio)."""
    hp, scalars, chunks, finite = self._unpack(dyn)
    empty = [int(np.prod(c.grad.shape)) == 0 for c in chunks]
    if any(empty):  # no elements: nothing to compute, nothing to pass
      keep = [c for c, e in zip(chunks, empty) if not e]
      dtypes = [d for d, e in zip(self.out_dtypes, empty) if not e]
      done, finite = self._kernel(hp, scalars, keep, dtypes, finite) if keep else ([], finite)
      if finite is None and self.rule.skip_nonfinite and not keep:
        finite = jnp.array(True)
      done = iter(done)
      return [(c.param if self.apply else jnp.zeros(c.grad.shape, d), c.moments) if e
              else next(done) for c, d, e in zip(chunks, self.out_dtypes, empty)], finite
    return self._kernel(hp, scalars, chunks, self.out_dtypes, finite)

  def _kernel(self, hp, scalars, chunks, out_dtypes, finite=None):
    """The kernel on groups of at most :data:`GROUP` chunks (XLA's compile
    time grows with the square of one call's aliased operands). ``finite``:
    the step's flag, when the caller has it (else the kernel reads it)."""
    if not self.rule.skip_nonfinite:
      finite = None
    elif finite is None and self.partition:  # a device sees only its shards
      finite = _update.all_finite([c.grad for c in chunks])
    if len(chunks) <= GROUP:
      results, found = self._call(hp, scalars, chunks, out_dtypes, finite)
      return results, (finite if finite is not None else found)
    if self.rule.skip_nonfinite and finite is None:  # one flag for the whole step
      finite = _update.all_finite([c.grad for c in chunks])
    results = []
    for i in range(0, len(chunks), GROUP):
      results += self._call(hp, scalars, chunks[i:i + GROUP], out_dtypes[i:i + GROUP],
                            finite)[0]
    return results, finite

  def _call(self, hp, scalars, chunks, out_dtypes, finite=None):
    rule = self.rule
    vector = _scalar_vector(hp, scalars, use_wd=self.use_wd, scale_lr=self.scale_lr,
                            finite=finite)
    ranges = [decay_ranges(c, self.use_wd) for c in chunks]
    has_param = (self.apply is not None or any(ranges) or rule.master) and all(
        c.param is not None for c in chunks)
    leaves = [(c.grad, c.moments, c.param) for c in chunks]
    common = dict(kind=rule.kind, nesterov=rule.nesterov, n_moments=len(rule.optax_names),
                  master=rule.master, frozen_nu=bool(rule.nu_frozen_at),
                  has_param=has_param, scale_lr=self.scale_lr, wd_ranges=ranges,
                  out_dtypes=out_dtypes, partition=self.partition)
    if not rule.trust_ratio:
      mode = "apply" if self.apply else "update"
      skip = 0 if not rule.skip_nonfinite else (1 if finite is None else 2)
      return _ffi.step(vector, leaves, mode=mode, skip=skip, **common)
    # LAMB: the direction (weight decay included) and the moments; the
    # per-parameter norms as XLA reductions (the XLA path's own, so the ratio
    # is bit-identical); then -lr * ratio * direction, as the update or applied.
    pairs, _ = _ffi.step(vector, leaves, mode="direction", skip=0, **common)
    ratios, seg_ends = [], []
    for (d, _), c in zip(pairs, chunks):
      p_norm, u_norm = c.segments.norms((c.param.astype(d.dtype), d))
      ratios.append(jnp.ravel(_rule.trust_ratio(p_norm, u_norm)))
      seg_ends.append(_segment_ends(c))
    outs = _ffi.scale(vector, jnp.concatenate(ratios),
                      [(d, c.param) for (d, _), c in zip(pairs, chunks)],
                      apply=self.apply is not None, scale_lr=self.scale_lr,
                      seg_ends=seg_ends, out_dtypes=out_dtypes)
    return [(o, m) for o, (_, m) in zip(outs, pairs)], None


def _scalar_vector(hp: _rule.Hyper, sc: _rule.StepScalars, *, use_wd: bool,
                   scale_lr: bool, finite=None) -> jax.Array:
  """The kernel's float32 scalars (:data:`_ffi.SCALARS`), computed as the XLA
  path computes them: ``1 - b1`` in double for a Python float (as optax folds
  it), in float32 for an array; a missing correction is a division by 1."""
  one = lambda x: 1.0 if x is None else x  # pylint: disable=unnecessary-lambda-assignment
  values = dict(
      c1=1 - hp.b1, b1=hp.b1, c2=1 - hp.b2, b2=hp.b2, eps=hp.eps, eps_root=hp.eps_root,
      bc_mu=one(sc.bc_mu), bc_mu_next=one(sc.bc_mu_next), bc_nu=one(sc.bc_nu),
      radam_r=one(sc.radam_r),
      radam_on=0.0 if sc.radam_on is None else jnp.where(sc.radam_on, 1.0, 0.0),
      grad_scale=one(hp.grad_scale), wd=hp.weight_decay if use_wd else 0.0,
      neg_lr=-hp.learning_rate if scale_lr else 1.0,
      finite_in=1.0 if finite is None else jnp.where(finite, 1.0, 0.0))
  return jnp.stack([jnp.asarray(values[k], jnp.float32) for k in _ffi.SCALARS])

def _segment_ends(chunk) -> list[int]:
  """End offsets of the segments over which ``chunk.segments.norms`` sums
  (one ratio each, in order)."""
  n = int(np.prod(chunk.grad.shape))
  seg = chunk.segments
  if seg is _segments.WHOLE or len(seg.buffer.leaves) == 1:
    return [n]
  return [int(e) for e in np.cumsum([s for s in seg.sizes if s])]
