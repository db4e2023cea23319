"""Quantized moments: 8-bit and 4-bit codes with float32 scales.

* :class:`Quantized` — a moment format (bits, block size, code map,
  normalization, ``min_quantized_size``); ``"q8"`` and ``"q4"`` name the
  settings of the two papers (:func:`resolve`).
* :class:`QArray` — one quantized moment: a small pytree of ``codes``
  (``uint8``, two 4-bit codes per byte) and float32 ``scales``, whose static
  auxiliary data (the format and the decoded shape) says how to read them.

Normalization is either *block-wise* (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization": consecutive blocks of
``block_size`` elements, one absmax per block) or *rank-1* (Li et al. 2023,
"Memory Efficient Optimizers with 4-bit States": an element of an N-d tensor
is scaled by the smallest of the maxima of its row, its column, ...; a 1-D
tensor falls back to blocks). The normalized value, in [-1, 1] (signed) or
[0, 1] (unsigned), is stored as the index of the nearest entry of a sorted
code map: the *dynamic* map (a decimal exponent and linear fraction levels:
fine near zero, coarse near one) or the *linear* one, which for unsigned
moments leaves out zero (a zero code for ``nu`` would blow up
``1 / sqrt(nu)``).

The update path (:func:`jadam._update.apply_rule`) decodes a chunk's
moments to float32, runs the rule, and encodes the new moments, all inside
the step's one jitted computation; the rule itself never sees codes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _codes

NAMES = ("q8", "q4")
CODES = ("dynamic", "linear")


@dataclasses.dataclass(frozen=True)
class Quantized:
  """A quantized moment format.

  Args:
    bits: 8 or 4 bits per element (4-bit codes are stored two per byte).
    block_size: elements per block of block-wise normalization (one float32
      absmax each); with ``rank1``, the block size of 1-D tensors. A power of
      two from 16 to 4096.
    code: ``"dynamic"`` (dynamic exponent map) or ``"linear"`` (evenly spaced;
      for an unsigned moment zero is left out).
    rank1: rank-1 normalization of tensors with two or more dimensions.
    min_quantized_size: tensors with fewer elements keep float32 moments.
    signed: whether the values may be negative; ``None`` (the default): as the
      moment needs (``mu`` signed, ``nu`` and ``nu_max`` unsigned).

  Example:
    >>> import jadam
    >>> tx = jadam.adam(1e-3, mu_dtype="q8", nu_dtype=jadam.Quantized(bits=8, block_size=128))
  """

  bits: int = 8
  block_size: int = 256
  code: str = "dynamic"
  rank1: bool = False
  min_quantized_size: int = 4096
  signed: bool | None = None

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"`jadam.Quantized({name}=...)` must be {want}, "
                       f"got {getattr(self, name)!r}")
    if self.bits not in (4, 8) or isinstance(self.bits, bool):
      bad("bits", "4 or 8")
    b = self.block_size
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not (
        16 <= b <= 4096 and b & (b - 1) == 0):
      bad("block_size", "a power of two from 16 to 4096")
    if self.code not in CODES:
      bad("code", f"one of {CODES}")
    if not isinstance(self.rank1, (bool, np.bool_)):
      bad("rank1", "a bool")
    m = self.min_quantized_size
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
      bad("min_quantized_size", "a non-negative integer")
    if self.signed is not None and not isinstance(self.signed, (bool, np.bool_)):
      bad("signed", "None or a bool")

  @property
  def table(self) -> np.ndarray:
    """The sorted code map (``2 ** bits`` float32 values in [-1, 1] or [0, 1])."""
    return _codes.code_map(self.bits, self.code, bool(self.signed))


def resolve(fn: str, name: str, value):
  """Canonicalizes a moment format: ``None``, a float ``np.dtype``, or a
  :class:`Quantized` (``"q8"``/``"q4"`` expanded; ``signed`` not yet set)."""
  if isinstance(value, Quantized):
    return value
  if isinstance(value, str) and value in NAMES:
    return value  # expanded per moment by `for_moment` (mu and nu differ)
  from . import _validate as V
  try:
    return V.check_dtype(fn, name, value)
  except ValueError:
    raise ValueError(
        f"`{fn}({name}=...)` must be None or a floating or complex dtype (e.g. "
        f"jnp.float32, jnp.bfloat16), or a quantized format ('q8', 'q4' or a "
        f"jadam.Quantized), got {value!r}") from None


def for_moment(value, moment: str):
  """The format of moment ``moment`` (``"mu"``, ``"nu"`` or ``"nu_max"``) for
  a resolved ``mu_dtype``/``nu_dtype``: a dtype or None unchanged, a
  :class:`Quantized` with ``signed`` set."""
  signed = moment == "mu"
  if value == "q8":
    return Quantized(8, 256, "dynamic", False, signed=signed)
  if value == "q4":
    if signed:
      return Quantized(4, 128, "dynamic", False, signed=True)
    return Quantized(4, 128, "linear", True, signed=False)
  if isinstance(value, Quantized) and value.signed is None:
    return dataclasses.replace(value, signed=signed)
  return value


def is_quantized(value) -> bool:
  return isinstance(value, Quantized) or (isinstance(value, str) and value in NAMES)


# ------------------------------------------------------------ quantized arrays


@jax.tree_util.register_pytree_with_keys_class
class QArray:
  """One quantized moment: codes and scales with their static format.

  Attributes:
    codes: ``uint8``. Block-wise: ``(..., blocks, block_size * bits / 8)``.
      Rank-1: ``(ceil(n / 2),)`` for 4 bits (``(n,)`` for 8), ``n`` the
      elements covered (even).
    scales: a tuple of float32 arrays. Block-wise: ``(absmax,)`` of shape
      ``(..., blocks)``. Rank-1: one vector of maxima per dimension of
      ``view``.
    fmt: the :class:`Quantized` format (``signed`` set).
    shape: the decoded shape, or ``None`` for a packed buffer (block-wise:
      decodes to ``(..., blocks * block_size)``, whatever slice of the
      buffer the codes hold).
    view: rank-1 only: the N-d shape of the tensor at the start of the
      decoded elements; the rest (a buffer's padding) decodes to zero.
  """

  __slots__ = ("codes", "scales", "fmt", "shape", "view")

  def __init__(self, codes, scales, fmt: Quantized, shape, view=None):
    self.codes = codes
    self.scales = tuple(scales)
    self.fmt = fmt
    self.shape = shape
    self.view = view

  @property
  def rank1(self) -> bool:
    return self.view is not None

  @property
  def decoded_shape(self) -> tuple[int, ...]:
    """The shape :func:`decode` returns."""
    if self.shape is not None:
      return self.shape
    blocks = np.shape(self.codes)[:-1]
    return (*blocks[:-1], blocks[-1] * self.fmt.block_size)

  @property
  def dtype(self):
    """The dtype the moment decodes to (and the rule computes in)."""
    return np.dtype(np.float32)

  def __repr__(self) -> str:
    return (f"QArray(bits={self.fmt.bits}, {'rank-1' if self.rank1 else 'block-wise'}, "
            f"codes={getattr(self.codes, 'shape', None)}, shape={self.shape})")

  def tree_flatten_with_keys(self):
    K = jax.tree_util.GetAttrKey
    children = [(K("codes"), self.codes)] + [
        (K(f"scales{i}"), s) for i, s in enumerate(self.scales)]
    return children, (self.fmt, self.shape, self.view, len(self.scales))

  def tree_flatten(self):
    return [self.codes, *self.scales], (self.fmt, self.shape, self.view, len(self.scales))

  @classmethod
  def tree_unflatten(cls, aux, children):
    fmt, shape, view, _ = aux
    obj = object.__new__(cls)
    obj.codes, obj.scales = children[0], tuple(children[1:])
    obj.fmt, obj.shape, obj.view = fmt, shape, view
    return obj

  def map_arrays(self, fn) -> QArray:
    """The same moment with ``fn`` applied to codes and block scales (both
    have the blocks as their leading axes): reshaping a ZeRO slice."""
    if self.rank1:
      raise ValueError("a rank-1 quantized moment cannot be split into slices")
    return QArray(fn(self.codes, 2), tuple(fn(s, 1) for s in self.scales), self.fmt, self.shape)


def _block_zeros(fmt: Quantized, lead: tuple[int, ...], blocks: int, sharding=None):
  kw = {} if sharding is None else {"device": sharding}
  return (jnp.zeros((*lead, blocks, fmt.block_size * fmt.bits // 8), jnp.uint8, **kw),
          (jnp.zeros((*lead, blocks), jnp.float32, **kw),))


def zeros(fmt: Quantized, shape, *, buffer: bool = False, view=None, sharding=None) -> QArray:
  """An all-zero quantized moment.

  Args:
    fmt: the format (``signed`` set).
    shape: the moment's shape: a tensor's, or a packed buffer's (last axis
      a multiple of the block size) with ``buffer``.
    buffer: a packed buffer: decodes to ``shape`` without a final reshape,
      and (block-wise) a slice of it decodes to its own elements.
    view: rank-1 normalization of this N-d tensor at the buffer's start
      (with ``buffer``), or ``None``; for a tensor, rank-1 when ``fmt.rank1``
      and it has two or more dimensions.
    sharding: a sharding for the codes and block scales (buffers only).
  """
  shape = tuple(int(d) for d in shape)
  if not buffer and fmt.rank1 and len(shape) >= 2:
    view = shape
  if buffer and fmt.rank1 and view is not None and len(view) < 2:
    view = None
  if not fmt.rank1:
    view = None
  n = math.prod(shape)
  if view is not None:
    per_byte = 8 // fmt.bits
    codes = jnp.zeros((-(-n // per_byte),), jnp.uint8)
    if sharding is not None and codes.shape[0] % _num_devices(sharding) == 0:
      codes = jax.device_put(codes, sharding)
    scales = tuple(jnp.zeros((d,), jnp.float32) for d in view)
    return QArray(codes, scales, fmt, shape, tuple(view))
  if buffer:
    if shape[-1] % fmt.block_size:
      raise ValueError(f"a quantized buffer's length ({shape[-1]}) must be a multiple of "
                       f"its block size ({fmt.block_size})")
    codes, scales = _block_zeros(fmt, shape[:-1], shape[-1] // fmt.block_size, sharding)
    return QArray(codes, scales, fmt, None)
  codes, scales = _block_zeros(fmt, (), -(-n // fmt.block_size))
  return QArray(codes, scales, fmt, shape)


def _num_devices(sharding) -> int:
  return len(getattr(sharding, "device_set", ())) or 1


def as_arrays(tree):
  """``tree`` with each :class:`QArray` as a ``jax.ShapeDtypeStruct`` of its
  decoded shape (float32): for comparing a state's structure with grads."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.decoded_shape, np.float32)
      if isinstance(x, QArray) else x,
      tree, is_leaf=lambda x: isinstance(x, QArray))


def sharding_ref(m):
  """An array split over devices like moment ``m``'s elements (its 1-D
  block scales, or rank-1 codes): what a buffer beside it is resharded like."""
  if not isinstance(m, QArray):
    return m
  return m.codes if m.rank1 else m.scales[0]


def decode(m):
  """A moment as float32 values (a plain array passes through)."""
  if not isinstance(m, QArray):
    return m
  fmt = m.fmt
  table = jnp.asarray(fmt.table)
  idx = _codes.unpack(m.codes, fmt.bits).astype(jnp.int32)
  if m.rank1:
    n = math.prod(m.view)
    norm = _rank1_norm(m.scales)
    x = (jnp.take(table, idx[:n]).reshape(m.view) * norm).reshape(-1)
    total = math.prod(m.shape)
    if total > n:
      x = jnp.pad(x, (0, total - n))
    return x.reshape(m.shape)
  x = jnp.take(table, idx) * m.scales[0][..., None]
  if m.shape is None:
    return x.reshape(*x.shape[:-2], -1)
  return x.reshape(-1)[:math.prod(m.shape)].reshape(m.shape)


def encode_like(x: jax.Array, old):
  """``x`` (float) stored in ``old`` 's format (a plain array: its dtype)."""
  if not isinstance(old, QArray):
    return x.astype(old.dtype)
  return encode(x, old.fmt, old.shape, old.view)


def encode(x: jax.Array, fmt: Quantized, shape, view=None) -> QArray:
  """Quantizes float ``x`` (shaped as ``shape``; a buffer slice when ``shape``
  is None) into a :class:`QArray`."""
  x = x.astype(jnp.float32)
  if view is not None:
    n = math.prod(view)
    t = x.reshape(-1)[:n].reshape(view)
    scales = _rank1_stats(jnp.abs(t))
    norm = _rank1_norm(scales)
    xn = jnp.where(norm > 0, t / jnp.where(norm > 0, norm, 1), 0).reshape(-1)
    total = math.prod(shape)
    per_byte = 8 // fmt.bits
    xn = jnp.pad(xn, (0, -(-total // per_byte) * per_byte - n))
    return QArray(_codes.pack(_codes.nearest(xn, fmt.bits, fmt.code, bool(fmt.signed)), fmt.bits), scales, fmt, shape, view)
  b = fmt.block_size
  if shape is None:
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
  else:
    flat = x.reshape(-1)
    nb = -(-flat.size // b)
    blocks = jnp.pad(flat, (0, nb * b - flat.size)).reshape(nb, b)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1)[..., None]
  xn = jnp.where(absmax[..., None] > 0, blocks / safe, 0)
  return QArray(_codes.pack(_codes.nearest(xn, fmt.bits, fmt.code, bool(fmt.signed)), fmt.bits), (absmax,), fmt, shape)


def _rank1_stats(a: jax.Array) -> tuple[jax.Array, ...]:
  """Per dimension, the maximum of ``a`` over all other dimensions."""
  axes = range(a.ndim)
  return tuple(jnp.max(a, axis=tuple(j for j in axes if j != i)) for i in axes)


def _rank1_norm(stats) -> jax.Array:
  """The element-wise minimum of the per-dimension maxima, broadcast."""
  k = len(stats)
  out = None
  for i, s in enumerate(stats):
    s = s.reshape((1,) * i + (-1,) + (1,) * (k - i - 1))
    out = s if out is None else jnp.minimum(out, s)
  return out
