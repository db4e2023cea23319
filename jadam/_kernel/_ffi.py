"""Builds, caches and registers the fused Adam kernel, and calls it.

The kernel (``adam_kernel.cc``, beside this file) is compiled on first use with
the system C++ compiler against the XLA FFI headers that ship with jaxlib, and
cached under ``$JADAM_CACHE_DIR`` (default ``~/.cache/jadam``) in a directory
named by a hash of the source, the flags, jaxlib's version, the compiler's
version and the machine, so an upgrade of any of them builds anew. A file lock
keeps two processes from building the same library at once. Where no compiler,
no FFI or no build works, :func:`available` is False and jadam runs its XLA
path: one notice is logged, nothing raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from .. import _codes, _quant
from . import _partition

_LOG = logging.getLogger("jadam")

SOURCE = os.path.join(os.path.dirname(__file__), "adam_kernel.cc")
HEADERS = [os.path.join(os.path.dirname(__file__), name)
           for name in ("adam_rule.h", "adam_quant.h", "adam_rank1.h", "adam_master.h",
                        "adam_scale.h", "adam_threads.h")]
FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
         "-fno-trapping-math",
         "-fPIC", "-shared", "-fvisibility=hidden", "-w")
"""No -ffast-math and no contraction: every float32 operation of the rule,
rounded, in order. -fno-trapping-math only says that floating-point
exceptions are not observed, so a select between two computed values stays a
select (the quantized encode's loops vectorize); no value changes. Built for
the host CPU (-march=native: its features are in the cache key), as XLA:CPU
builds its own code."""

STEP_TARGET = "jadam_adam_step"
SCALE_TARGET = "jadam_adam_scale"

SCALARS = ("c1", "b1", "c2", "b2", "eps", "eps_root", "bc_mu", "bc_mu_next", "bc_nu",
           "radam_r", "radam_on", "grad_scale", "wd", "neg_lr", "finite_in")
"""The float32 scalars every call takes, in the order of the kernel's ``Scalar`` enum."""

KINDS = {"adam": 0, "amsgrad": 1, "adamax": 2, "radam": 3}
MODES = {"update": 0, "apply": 1, "direction": 2}
MASTERS = {None: 0, "float32": 1, "q8": 2}


def cache_dir() -> str:
  root = os.environ.get("JADAM_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "jadam")
  return root


def _compiler() -> tuple[str, str] | None:
  """``(path, version line)`` of the C++ compiler: ``$CXX``, else c++ or g++ or clang++."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    path = shutil.which(name) if name else None
    if path:
      try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
      except (OSError, subprocess.SubprocessError):
        continue
      return path, (out.splitlines() or [""])[0]
  return None


def _cpu_features() -> bytes:
  """The host CPU's model and feature flags (a library built with
  -march=native runs only where they match)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines))).encode()
  except OSError:
    return platform.processor().encode()


def _build(include: str) -> str:
  """Path of the built library, compiling it if this configuration has none yet."""
  found = _compiler()
  if found is None:
    raise RuntimeError("no C++ compiler found (set $CXX)")
  cxx, version = found
  source = b""
  for path in [SOURCE] + HEADERS:  # the key covers every file the build reads
    with open(path, "rb") as f:
      source += f.read()
  import jaxlib  # pylint: disable=import-outside-toplevel
  key = hashlib.sha256(b"\0".join([
      source, " ".join(FLAGS).encode(), jaxlib.__version__.encode(), version.encode(),
      platform.machine().encode(), platform.system().encode(), _cpu_features()])).hexdigest()[:16]
  root = cache_dir()
  lib = os.path.join(root, f"kernel-{key}", "libjadam_adam.so")
  if os.path.exists(lib):
    return lib
  os.makedirs(os.path.dirname(lib), exist_ok=True)
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only: elsewhere, no kernel)
  with open(os.path.join(root, f"kernel-{key}.lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
    if not os.path.exists(lib):
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(lib))
      os.close(fd)
      try:
        proc = subprocess.run([cxx, *FLAGS, "-I", include, SOURCE, "-o", tmp],
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode:
          raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-400:]}")
        os.replace(tmp, lib)  # atomic: a reader never sees half a library
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
  return lib


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA:CPU (once per process)."""
  try:
    include = jax.ffi.include_dir()
    lib = ctypes.cdll.LoadLibrary(_build(include))
    jax.ffi.register_ffi_target(STEP_TARGET, jax.ffi.pycapsule(lib.JadamAdamStep),
                                platform="cpu")
    jax.ffi.register_ffi_target(SCALE_TARGET, jax.ffi.pycapsule(lib.JadamScaleStep),
                                platform="cpu")
  except Exception as e:  # pylint: disable=broad-except  (any failure: the XLA path)
    _LOG.warning("fused Adam kernel unavailable, using the XLA path (%s)",
                 str(e).splitlines()[0] if str(e) else type(e).__name__)
    return False
  return True


def _i64(values) -> np.ndarray:
  # An FFI array attribute must not be empty.
  return np.asarray(list(values) or [0], np.int64)


def _qformats(leaves, n_moments: int):
  """The quantized formats of the leaves' moments: ``(qslots, qndim, qint,
  qfloat)``, the kernel's attributes (per leaf and moment a format index or
  -1, and its number of scale arrays; per format its bits, block size,
  dynamic, signed; then its table, the
  dynamic map's thresholds and decade scales, ``2**bits + 2 * bits - 1``
  floats)."""
  formats, slots, ndims = [], [], []
  for _, moments, _ in leaves:
    for m in moments[:n_moments]:
      if not isinstance(m, _quant.QArray):
        slots.append(-1)
        ndims.append(0)
        continue
      if m.fmt not in formats:
        formats.append(m.fmt)
      slots.append(formats.index(m.fmt))
      ndims.append(len(m.scales))  # 1 block-wise; rank-1: one per dimension
  ints, floats = [], []
  for fmt in formats:
    signed = bool(fmt.signed)
    ints += [fmt.bits, fmt.block_size, fmt.code == "dynamic", signed]
    thresholds, scales = [0.0] * fmt.bits, [0.0] * (fmt.bits - 1)
    if fmt.code == "dynamic":
      _, scales, thresholds = _codes._dynamic_parts(fmt.bits, signed)  # pylint: disable=protected-access
    floats += [*fmt.table.tolist(), *thresholds, *scales]
  return _i64(slots), _i64(ndims), _i64(ints), np.asarray(floats or [0.0], np.float32)


def step(scalars, leaves, *, kind: str, nesterov: bool, n_moments: int, has_param: bool,
         mode: str, scale_lr: bool, skip: int, wd_ranges, out_dtypes, master=None,
         frozen_nu: bool = False, partition: bool = False, shared=None,
         alias_grads: bool = True):
  """One call of the step kernel.

  Args:
    scalars: float32 ``(len(SCALARS),)``.
    leaves: per leaf ``(g, moments, p)`` (``p`` only with ``has_param``); a
      moment is an array or a block-wise :class:`jadam._quant.QArray`; with
      ``master``, the master weights' state follows the ``n_moments`` moments.
    kind, nesterov, n_moments: the rule.
    has_param: whether each leaf passes ``p``.
    mode: ``"update"`` (the update, in ``out_dtypes``), ``"apply"`` (``p +
      u``, in place of ``p``) or ``"direction"`` (float32, weight decay
      included: LAMB's first pass).
    scale_lr: multiply by ``-learning_rate``.
    skip: 0, 1 (skip the step if a gradient is not finite) or 2 (skip it if
      ``scalars``' ``finite_in`` is 0).
    wd_ranges: per leaf, the ``(start, end)`` element ranges that decay.
    out_dtypes: per leaf, the dtype of its result (``"update"`` mode;
      float32 with ``master``).
    master: the master weights' format (:mod:`jadam._master`): ``None``,
      ``"float32"`` or ``"q8"`` (then ``has_param``; not ``"direction"``).
    frozen_nu: ``nu`` stays as it is (1-bit Adam after its warm-up; its
      quantized codes are encoded again, as the XLA path encodes them).
    partition: run on each device's shards under GSPMD
      (:mod:`jadam._kernel._partition`): float moments, each leaf's decay
      everywhere or nowhere, ``skip`` 0 or 2.
    shared: ``(buffers, offsets)``: the ``n_moments`` float moments of every
      leaf live in ``buffers`` (1-D, shared by the leaves), leaf ``j``'s at
      element ``offsets[j]`` (disjoint ranges); the leaves then pass no
      moments (``()``). Not with ``partition``.
    alias_grads: in ``"update"`` mode, write each update over its gradient
      where the dtypes match (a temporary gradient gives its buffer; a fresh
      one is faulted in page by page every step, which costs on large
      leaves). XLA copies a gradient it cannot give up (an argument not
      donated), and the aliases cost compile time on many small leaves.

  Returns:
    ``([(out, moments)] per leaf, finite or None)``: the moments in their
    formats, updated in place; with ``shared``, ``([(out, ())] per leaf,
    finite or None, new buffers)``.
  """
  assert shared is None or (not partition and all(not m for _, m, _ in leaves))
  args, outs, aliases = [scalars], [], {}
  out_src, leaf_of_arg, leaf_of_out, gradients = [], [None], [], []  # (for partition)
  for j, ((g, moments, p), dtype) in enumerate(zip(leaves, out_dtypes)):
    out_dtype = {"apply": p.dtype if p is not None else None,
                 "direction": jnp.float32}.get(mode, dtype)
    at_out = len(outs)
    outs.append(jax.ShapeDtypeStruct(g.shape, out_dtype))
    out_src.append(len(args))
    gradients.append(len(args))
    if mode == "update" and g.dtype == out_dtype and alias_grads:
      # The update overwrites the gradient, block by block after reading it: a
      # gradient computed in the same jit (a temporary) gives its buffer, where
      # a fresh one would be faulted in page by page every step.
      aliases[len(args)] = at_out
    args.append(g)
    # The moments are updated in place: an array, or a QArray's codes and
    # scales; and so is the master weights' state.
    for x in jax.tree.leaves(tuple(moments)):
      aliases[len(args)] = len(outs)
      out_src.append(len(args))
      args.append(x)
      outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    if has_param:
      if mode == "apply":  # and so are the params
        aliases[len(args)] = at_out
      args.append(p)
    leaf_of_arg += [j] * (len(args) - len(leaf_of_arg))
    leaf_of_out += [j] * (len(outs) - len(leaf_of_out))
  buffers, moment_at = shared if shared is not None else ((), [])
  for x in buffers:  # updated in place
    aliases[len(args)] = len(outs)
    out_src.append(len(args))
    args.append(x)
    outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  if skip:
    outs.append(jax.ShapeDtypeStruct((), jnp.bool_))
    out_src.append(None)
    leaf_of_out.append(None)
  qslots, qndim, qint, qfloat = _qformats(
      [(None, (None,) * n_moments, None)] * len(leaves) if shared else leaves, n_moments)

  def build(shapes):
    # A shard of a leaf decays where the leaf does: everywhere or nowhere.
    sizes = [int(np.prod(shapes[i])) for i in gradients]
    local = wd_ranges if not partition else [[(0, n)] if r else [] for r, n in
                                              zip(wd_ranges, sizes)]
    offsets, flat = [0], []
    for ranges in local:
      flat += [x for r in ranges for x in r]
      offsets.append(offsets[-1] + len(ranges))
    shaped = [o if i is None else jax.ShapeDtypeStruct(shapes[i], o.dtype)
              for o, i in zip(outs, out_src)]
    return functools.partial(
        jax.ffi.ffi_call(STEP_TARGET, shaped, input_output_aliases=aliases,
                         vmap_method="sequential"),
        kind=np.int64(KINDS[kind]), nesterov=bool(nesterov),
        n_moments=np.int64(n_moments), has_param=bool(has_param), mode=np.int64(MODES[mode]),
        scale_lr=bool(scale_lr), skip=np.int64(skip), master=np.int64(MASTERS[master]),
        frozen_nu=bool(frozen_nu), wd_offsets=_i64(offsets), wd_ranges=_i64(flat),
        qslots=qslots, qndim=qndim, qint=qint, qfloat=qfloat,
        moment_at=_i64(moment_at) if shared is not None else _i64([-1]))

  if partition:
    res = _partition.elementwise(build, args, leaf_of_arg, leaf_of_out)
  else:
    res = build([x.shape for x in args])(*args)
  res, pairs = iter(res), []
  for _, moments, _ in leaves:
    out = next(res)
    parts, treedef = jax.tree.flatten(tuple(moments))
    pairs.append((out, jax.tree.unflatten(treedef, [next(res) for _ in parts])))
  new_buffers = tuple(next(res) for _ in buffers)
  finite = next(res) if skip else None
  return (pairs, finite) if shared is None else (pairs, finite, new_buffers)


def scale(scalars, ratios, leaves, *, apply: bool, scale_lr: bool, seg_ends, out_dtypes):
  """LAMB's second pass: ``-lr * (d * ratio)`` per segment, as updates (in
  ``out_dtypes``) or applied to ``p`` in place. ``leaves``: per leaf ``(d, p)``;
  ``seg_ends``: per leaf, its segments' end offsets; ``ratios``: one per
  segment, all leaves' in order."""
  args, outs, aliases, offsets, ends = [scalars, ratios], [], {}, [0], []
  for (d, p), dtype, leaf_ends in zip(leaves, out_dtypes, seg_ends):
    args.append(d)
    if apply:
      aliases[len(args)] = len(outs)
      args.append(p)
    outs.append(jax.ShapeDtypeStruct(d.shape, p.dtype if apply else dtype))
    ends += list(leaf_ends)
    offsets.append(len(ends))
  return jax.ffi.ffi_call(SCALE_TARGET, outs, input_output_aliases=aliases,
                          vmap_method="sequential")(
      *args, apply=bool(apply), scale_lr=bool(scale_lr), seg_offsets=_i64(offsets),
      seg_ends=_i64(ends))
