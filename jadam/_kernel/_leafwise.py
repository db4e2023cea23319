"""The ``layout="flat"`` optimizers' step on the kernel without packing.

The flat layout keeps its moments packed, but its gradients come in and its
updates go out as trees. XLA's path packs the gradients (a concatenate of
every leaf) and unpacks the updates (a slice per leaf): two copies of every
small leaf per step, and, on many leaves, a compile time that grows fast with
their number (2000 leaves: about 20 s for the pack and unpack alone). The
kernel instead reads each gradient leaf where it is and writes each update
leaf, with every leaf's moments at its offset in the shared packed buffers
(``moment_at``, ``adam_kernel.cc``), updated in place. The moments' padding is
no leaf's: the kernel leaves it as it is (XLA's path steps it with zero
gradients).

Float moments only, without LAMB or master weights, on one device's arrays
(or inside ``shard_map``): other steps take XLA's pack and the packed kernel
(:func:`jadam._kernel.update_and_finish`).
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import _layout
from .. import _rule
from .. import _segments
from .. import _update
from . import _ffi
from . import _policy


def keys(rule: _rule.Rule, hp: _rule.Hyper, count, layout, grads, moments: list,
         params) -> tuple[str, ...]:
  """The keys of the buffers that :func:`update` steps (``grads`` and
  ``params``: trees; ``moments``: the packed moments); the others are
  packed. ``kernel="auto"``: the buffers of more than one leaf, which XLA's
  path would concatenate and slice (a leaf with a buffer of its own is
  neither, and its update stays XLA's, see :data:`_policy.AUTO`); with the
  kernel everywhere, every buffer."""
  mode = _policy.effective_rule(rule).kernel if rule.kernel == "auto" else rule.kernel
  if mode == "xla" or rule.trust_ratio or rule.master:
    return ()
  if layout.pad_multiple != _layout.PAD_MULTIPLE:
    return ()  # packed to be split over a mesh
  chunks = _chunks(layout, layout.leaves_by_index(grads), moments,
                   layout.leaves_by_index(params))
  if not chunks or _policy.quantized(chunks):
    return ()
  hp = _update.evaluate_schedules(hp, count)  # (their values' dtypes are checked)
  if (_policy.unsupported(rule, hp, chunks, None) is not None
      or _policy.on_gspmd_mesh(chunks) or not _ffi.available()):
    return ()
  if mode != "auto":
    return tuple(layout.keys)
  return tuple(b.key for b in layout.buffers
               if sum(layout.segments[i].size > 0 for i in b.leaves) > 1)


def _chunks(layout, grads, moments, params) -> list:
  """A chunk per non-empty leaf, for the policy's checks (moments: the
  leaf's buffers)."""
  return [_update.Chunk(grads[i], tuple(m[seg.key] for m in moments),
                        None if params is None else params[i], _segments.WHOLE, (True,))
          for i, seg in enumerate(layout.segments) if seg is not None and seg.size]


def update(rule: _rule.Rule, hp: _rule.Hyper, count, layout, grads, moments, params,
           decay: tuple[bool, ...], *, use_wd: bool, scale_lr: bool, out_dtypes: dict,
           xla, finite=None):
  """One step of the flat layout on the kernel: gradients read from their
  leaves, updates written as leaves, moments updated in their packed buffers.

  Args:
    rule, hp, count: the static rule, the hyperparameters and the state's count.
    layout: the state's :class:`jadam.FlatLayout`.
    grads: the gradients' tree; ``params``: the params' tree (for weight
      decay) or ``None``.
    moments: per moment name, its :class:`jadam.Packed` buffers.
    decay: per leaf, whether weight decay applies.
    out_dtypes: per buffer key, the dtype of its leaves' updates.
    xla: ``xla(hp, count, grads, moments, params, finite=...)``, the same
      step as XLA's ops (run under ``jax.vmap`` and in derivatives, where the
      kernel has no rule).
    finite: the step's finiteness flag, when the caller has it (with
      ``skip_nonfinite``; else the kernel reads the gradients).

  Returns:
    ``(new_count, updates tree, new moments, finite)`` like ``xla``.
  """
  hp = _update.evaluate_schedules(hp, count)  # schedules' values: traced arrays
  hp_static, hp_arrays = _update.array_hyper(hp)
  static = _Step(rule, hp_static, layout, decay, use_wd, scale_lr, out_dtypes, xla)
  from . import _fused_with_fallbacks  # pylint: disable=import-outside-toplevel
  return _fused_with_fallbacks(static)((hp_arrays, count, grads, moments, params, finite))


class _Step:
  """A flat-layout step's static parts: the kernel's and XLA's way to run it."""

  def __init__(self, rule, hp_static, layout, decay, use_wd, scale_lr, out_dtypes, xla):
    self.rule, self.layout, self.decay, self.hp_static = rule, layout, decay, hp_static
    self.use_wd, self.scale_lr, self.out_dtypes, self._xla = use_wd, scale_lr, out_dtypes, xla

  def xla(self, dyn):
    hp_dyn, count, grads, moments, params, finite = dyn
    return self._xla(self.hp_static._replace(**hp_dyn), count, grads, moments, params,
                     finite=finite)

  def kernel(self, dyn):
    from . import GROUP, _scalar_vector  # pylint: disable=import-outside-toplevel
    hp_dyn, count, grads, moments, params, finite = dyn
    rule, layout = self.rule, self.layout
    hp, count_inc, scalars = _update.step_inputs(rule, self.hp_static._replace(**hp_dyn), count)
    g_leaves, p_leaves = layout.leaves_by_index(grads), layout.leaves_by_index(params)
    live = {i for i, s in enumerate(layout.segments) if s is not None and s.size}
    groups = []  # (buffer, leaf indices): the kernel's calls
    for b in layout.buffers:
      idx = [i for i in b.leaves if i in live]
      groups += [(b, idx[k:k + GROUP]) for k in range(0, len(idx), GROUP)]
    if not rule.skip_nonfinite:
      finite = None
    elif finite is None and len(groups) != 1:  # one flag for the whole step
      finite = _update.all_finite([g_leaves[i] for i in sorted(live)])
    skip = 0 if not rule.skip_nonfinite else (1 if finite is None else 2)
    vector = _scalar_vector(hp, scalars, use_wd=self.use_wd, scale_lr=self.scale_lr,
                            finite=finite)
    new = [{k: m[k] for k in m} for m in moments]
    updates = [None] * len(layout.segments)
    for b, idx in groups:
      ranges = [[(0, layout.segments[i].size)] if self.use_wd and self.decay[i] else []
                for i in idx]
      has_param = p_leaves is not None and any(ranges)
      leaves = [(g_leaves[i], (),
                 p_leaves[i] if has_param else None) for i in idx]
      pairs, found, buffers = _ffi.step(
          vector, leaves, kind=rule.kind, nesterov=rule.nesterov,
          n_moments=len(rule.optax_names), master=None, frozen_nu=bool(rule.nu_frozen_at),
          has_param=has_param, scale_lr=self.scale_lr, wd_ranges=ranges,
          out_dtypes=[self.out_dtypes[b.key]] * len(idx), mode="update", skip=skip,
          shared=(tuple(m[b.key] for m in new), [layout.segments[i].offset for i in idx]),
          alias_grads=len(b.leaves) == 1)  # small leaves: fresh updates (see _ffi.step)
      for m, x in zip(new, buffers):
        m[b.key] = x
      for i, (u, _) in zip(idx, pairs):
        updates[i] = u
      if finite is None:
        finite = found
    for i, seg in enumerate(layout.segments):
      if seg is not None and not seg.size:
        updates[i] = jnp.zeros(seg.shape, self.out_dtypes[seg.key])
    if rule.skip_nonfinite and finite is None:  # no element at all
      finite = jnp.array(True)
    new_moments = [type(m)(layout, d) for m, d in zip(moments, new)]
    return (_update.next_count(count, count_inc, finite), layout.treedef.unflatten(updates),
            new_moments, finite)

