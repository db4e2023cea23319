"""Adam's state: its containers and the zero state of any params.

* :class:`AdamState`, :class:`AmsgradState` — the count and the moments,
  mirroring the params (a tree, or packed buffers).
* :func:`init_state` — zero moments in each moment's format: a float dtype,
  or a quantized one (:mod:`jadam._quant`: a :class:`jadam.QArray` for each
  leaf or packed buffer large enough, float32 for the others).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _master
from . import _quant
from . import _rule
from . import _validate as V
from ._packed import Packed


class AdamState(NamedTuple):
  """Adam's state: the step count and the two moments, mirroring the params.

  Attributes:
    count: int32 scalar, the number of steps taken.
    mu: first moment, one leaf per param leaf (``None`` where the param is).
    nu: second moment (the infinity norm for Adamax).
  """

  count: jax.Array
  mu: Any
  nu: Any


class AmsgradState(NamedTuple):
  """AMSGrad's state: Adam's plus the running maximum of the bias-corrected ``nu``."""

  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any


class AdamMasterState(NamedTuple):
  """Adam's state with master weights (``master``: see :mod:`jadam._master`)."""

  count: jax.Array
  mu: Any
  nu: Any
  master: Any


class AmsgradMasterState(NamedTuple):
  """AMSGrad's state with master weights."""

  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any
  master: Any


def state_class(rule: _rule.Rule):
  if rule.master:
    return AmsgradMasterState if rule.kind == "amsgrad" else AdamMasterState
  return AmsgradState if rule.kind == "amsgrad" else AdamState


def _zeros(leaf, dtype) -> jax.Array:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      return jnp.zeros(leaf.shape, dtype, device=sharding)
    return jnp.zeros(leaf.shape, dtype)
  if not hasattr(leaf, "dtype"):
    leaf = jnp.asarray(leaf)
  return jnp.zeros_like(leaf, dtype=dtype)


def moment_formats(rule: _rule.Rule, mu_dtype=None, nu_dtype=None) -> tuple:
  """The format of each moment (``rule.moment_names``): ``None`` (the param's
  dtype), a float ``np.dtype`` or a :class:`jadam.Quantized` (``signed`` set).

  ``mu_dtype`` sets ``mu``'s; ``nu_dtype`` sets ``nu``'s and ``nu_max``'s.
  """
  want = {"mu": mu_dtype, "nu": nu_dtype, "nu_max": nu_dtype}
  formats = tuple(_quant.for_moment(want[name], name) for name in rule.optax_names)
  return formats + ((_master.state_dtype(rule.master),) if rule.master else ())


def moment_dtypes(rule: _rule.Rule, dtype, mu_dtype=None, nu_dtype=None) -> tuple[np.dtype, ...]:
  """The dtype of each moment of a param of ``dtype`` (float formats only)."""
  return tuple(np.dtype(f or dtype) for f in moment_formats(rule, mu_dtype, nu_dtype))


def init_state(fn: str, rule: _rule.Rule, params, mu_dtype=None, nu_dtype=None):
  """Zero moments mirroring ``params`` (``None`` leaves pass through).

  ``params`` may be any pytree: a tree of arrays or ``ShapeDtypeStruct`` s (the
  tree layout) or packed buffers (the flat layouts), whose nodes the moments
  keep (a :class:`jadam.Packed` keeps its layout). A quantized format gives
  a leaf (or buffer) of at least ``min_quantized_size`` elements a
  :class:`jadam._quant.QArray`, smaller ones float32 moments.
  """
  formats = moment_formats(rule, mu_dtype, nu_dtype)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: x is None or isinstance(x, Packed) or _is_nnx_variable(x))
  if rule.master:
    for path, node in flat:
      for leaf in (node.values() if isinstance(node, Packed) else jax.tree.leaves(node)):
        if not jnp.issubdtype(V.dtype_of(leaf), jnp.floating):
          raise ValueError(
              f"`{fn}(master_weights=...)` needs real float params; the param at "
              f"{jax.tree_util.keystr(path) or '<root>'} is {V.dtype_of(leaf).name}")
  moments = [[] for _ in rule.moment_names]
  for path, node in flat:
    if isinstance(node, Packed):
      for m, fmt in zip(moments, formats):
        m.append(Packed(node.layout, {
            k: _buffer_moment(fn, path, node.layout, k, v, fmt) for k, v in node.items()}))
      continue
    wrapper = None
    if _is_nnx_variable(node):
      (node,), wrapper = jax.tree.flatten(node)
    if node is not None:
      V.check_params_leaf(fn, path, node)
    for m, fmt in zip(moments, formats):
      moment = None if node is None else _leaf_moment(fn, path, node, fmt)
      if wrapper is not None and not isinstance(moment, _quant.QArray):
        moment = wrapper.unflatten([moment])
      # A quantized moment is not put inside the param's Variable: nnx sets a
      # Variable's value whole, and would turn the QArray into a dict.
      m.append(moment)
  return state_class(rule)(jnp.zeros([], jnp.int32), *(treedef.unflatten(m) for m in moments))


def _is_nnx_variable(x) -> bool:
  """A Flax ``nnx.Variable`` (a pytree node wrapping one value)."""
  return type(x).__module__.startswith("flax.nnx") and hasattr(x, "get_value")


def _check_quantizable(fn: str, path, leaf) -> None:
  if not jnp.issubdtype(V.dtype_of(leaf), jnp.floating):
    raise ValueError(
        f"`{fn}`: quantized moments need real float params; the param at "
        f"{jax.tree_util.keystr(path) or '<root>'} is {V.dtype_of(leaf).name}")


def _leaf_moment(fn: str, path, leaf, fmt):
  if not isinstance(fmt, _quant.Quantized):
    return _zeros(leaf, np.dtype(fmt or V.dtype_of(leaf)))
  _check_quantizable(fn, path, leaf)
  if math.prod(np.shape(leaf)) < fmt.min_quantized_size:
    return _zeros(leaf, np.dtype(np.float32))
  return _quant.zeros(fmt, np.shape(leaf))


def _buffer_moment(fn: str, path, layout, key: str, buf, fmt):
  """The moment of one packed buffer (of a FlatLayout, or ZeRO's layout,
  which wraps one as ``.flat``)."""
  if not isinstance(fmt, _quant.Quantized):
    return _zeros(buf, np.dtype(fmt or V.dtype_of(buf)))
  _check_quantizable(fn, path, buf)
  flat = getattr(layout, "flat", layout)
  b = flat.buffer(key)
  # Quantized when every leaf in it is large enough (packings for quantized
  # moments put the small leaves in buffers of their own).
  sizes = [flat.segments[i].size for i in b.leaves if flat.segments[i].size]
  if not sizes or min(sizes) < fmt.min_quantized_size:
    return _zeros(buf, np.dtype(np.float32))
  # Rank-1 normalization reads one leaf's N-d shape: a FlatLayout buffer of
  # one leaf. Buffers shared by leaves, or split over devices, use blocks.
  view = flat.segments[b.leaves[0]].shape if layout is flat and len(b.leaves) == 1 else None
  shape = tuple(np.shape(buf))
  if shape[-1] % fmt.block_size:
    raise ValueError(
        f"`{fn}`: packed buffer {key!r} has {shape[-1]} elements, not a multiple "
        f"of the quantized moments' block size {fmt.block_size}; pack with a "
        f"pad_multiple that is a multiple of it")
  sharding = getattr(buf, "sharding", None)
  if sharding is not None and not isinstance(sharding, jax.sharding.NamedSharding):
    sharding = None
  return _quant.zeros(fmt, shape, buffer=True, view=view, sharding=sharding)


def check_state(fn: str, rule: _rule.Rule, state) -> None:
  cls = state_class(rule)
  if not isinstance(state, cls):
    raise ValueError(
        f"`{fn}(state=...)` must be a jadam.{cls.__name__} (from the matching "
        f"init), got {type(state).__name__}"
    )
