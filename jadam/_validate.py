"""Argument checks: clear errors that name the argument and what was expected."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_scalar(fn: str, name: str, value) -> float | None:
  """The float value of a hyperparameter, or None if it is traced/a schedule."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool) or value is None:
    raise ValueError(f"`{fn}({name}=...)` must be a real number, got {value!r}")
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    raise ValueError(f"`{fn}({name}=...)` must be a real number, got {value!r}") from None
  # jnp.issubdtype knows bfloat16 and the float8 types (np.issubdtype does not).
  if arr.ndim != 0 or not (
      jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
  ):
    raise ValueError(
        f"`{fn}({name}=...)` must be a real scalar, got {type(value).__name__} "
        f"of shape {arr.shape} and dtype {arr.dtype}"
    )
  return float(arr)


def check_bool(fn: str, name: str, value) -> bool:
  """``value`` as a Python bool; raises a ValueError naming the argument
  unless it is True or False (a NumPy bool too)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{fn}({name}=...)` must be True or False, got {value!r}")
  return bool(value)


def check_positive_int(fn: str, name: str, value) -> int:
  """``value`` as a Python int; raises a ValueError naming the argument unless
  it is a positive integer (a Python or NumPy integer, not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"`{fn}({name}=...)` must be a positive integer, got {value!r}")
  return int(value)


def check_range(
    fn: str, name: str, value, *, low: float, high: float | None = None,
    high_open: bool = True, allow_schedule: bool = False,
) -> None:
  """Checks ``low <= value < high`` (or ``<= high``) for concrete values.

  Traced values (e.g. under ``optax.inject_hyperparams``) cannot be checked
  and pass; schedules pass where ``allow_schedule``.
  """
  if callable(value) and not allow_schedule:
    raise ValueError(f"`{fn}({name}=...)` must be a number, not a schedule")
  x = _concrete_scalar(fn, name, value)
  if x is None:
    return
  if high is None:
    ok, rng = (math.isfinite(x) and x >= low), f"a finite number >= {low:g}"
  else:
    ok = math.isfinite(x) and low <= x and (x < high if high_open else x <= high)
    rng = f"in [{low:g}, {high:g}{')' if high_open else ']'}"
  if not ok:
    hint = ""
    dt = getattr(value, "dtype", None)
    if dt is not None and jnp.issubdtype(dt, jnp.floating) and jnp.dtype(dt).itemsize < 4:
      hint = (f" ({jnp.dtype(dt).name} rounds it there: optax.inject_hyperparams casts "
              "hyperparameters to the params' dtype unless given "
              "hyperparam_dtype=jnp.float32)")
    raise ValueError(f"`{fn}({name}=...)` must be {rng}, got {value!r}{hint}")


def check_real(fn: str, name: str, value) -> None:
  """Checks that a concrete value is a finite real number."""
  x = _concrete_scalar(fn, name, value)
  if x is not None and not math.isfinite(x):
    raise ValueError(f"`{fn}({name}=...)` must be a finite number, got {value!r}")


def check_dtype(fn: str, name: str, dtype) -> np.dtype | None:
  """Canonicalizes a moment dtype; it must be None or a floating (or complex,
  for complex params) dtype."""
  if dtype is None:
    return None
  try:
    dt = np.dtype(jnp.dtype(dtype))
  except TypeError:
    raise ValueError(
        f"`{fn}({name}=...)` must be None or a floating dtype "
        f"(e.g. jnp.float32, jnp.bfloat16), got {dtype!r}"
    ) from None
  if not jnp.issubdtype(dt, jnp.inexact):
    raise ValueError(
        f"`{fn}({name}=...)` must be None or a floating or complex dtype "
        f"(e.g. jnp.float32, jnp.bfloat16, jnp.complex64), got {dt.name}"
    )
  return np.dtype(jax.dtypes.canonicalize_dtype(dt))


def check_choice(fn: str, name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"`{fn}({name}=...)` must be one of {tuple(choices)}, got {value!r}")


def dtype_of(x) -> np.dtype:
  """The dtype of an array, ``jax.ShapeDtypeStruct``, tracer or Python scalar."""
  dt = getattr(x, "dtype", None)
  return np.dtype(dt) if dt is not None else np.dtype(jnp.asarray(x).dtype)


def _is_none(x) -> bool:
  return x is None


def flatten_with_none(tree) -> tuple[list[tuple[Any, Any]], Any]:
  """Flattens keeping ``None`` leaves (they mark params without state)."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)


def check_same_structure(name_a: str, a, name_b: str, b, *, shapes: bool = True) -> None:
  """Raises a ValueError naming the first path where two trees differ.

  Compares the tree structure (``None`` leaves included) and, with ``shapes``,
  every leaf's shape: an elementwise op would otherwise broadcast silently.
  """
  flat_a, def_a = flatten_with_none(a)
  flat_b, def_b = flatten_with_none(b)
  if def_a != def_b:
    paths_a = [jax.tree_util.keystr(p) for p, _ in flat_a]
    paths_b = [jax.tree_util.keystr(p) for p, _ in flat_b]
    for pa, pb in zip(paths_a, paths_b):
      if pa != pb:
        raise ValueError(
            f"`{name_a}` and `{name_b}` have different tree structures: the "
            f"first difference is at {pa or '<root>'} in `{name_a}` versus "
            f"{pb or '<root>'} in `{name_b}`"
        )
    if len(paths_a) != len(paths_b):
      longer, name, n = (
          (paths_a, name_a, len(paths_b)) if len(paths_a) > len(paths_b)
          else (paths_b, name_b, len(paths_a))
      )
      raise ValueError(
          f"`{name_a}` and `{name_b}` have different tree structures: "
          f"{longer[n] or '<root>'} is only in `{name}` "
          f"({len(paths_a)} versus {len(paths_b)} leaves)"
      )
    raise ValueError(
        f"`{name_a}` and `{name_b}` have the same leaf paths but different "
        f"container types: {def_a} versus {def_b}"
    )
  if not shapes:
    return
  for (path, x), (_, y) in zip(flat_a, flat_b):
    if (x is None) != (y is None):
      raise ValueError(
          f"`{name_a}` and `{name_b}` differ at {jax.tree_util.keystr(path) or '<root>'}: "
          f"one holds None, the other {'an array' if x is None else 'None'}"
      )
    if x is not None and np.shape(x) != np.shape(y):
      raise ValueError(
          f"`{name_a}` and `{name_b}` differ at {jax.tree_util.keystr(path) or '<root>'}: "
          f"shape {np.shape(x)} versus {np.shape(y)} (jadam never broadcasts)"
      )


def resolve_mask(fn: str, mask, params) -> list[bool]:
  """Per-leaf booleans from a mask tree (a prefix of params) or a callable."""
  if mask is None:
    flat, _ = flatten_with_none(params)
    return [True] * len(flat)
  mask_tree = mask(params) if callable(mask) else mask
  try:
    full = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub, is_leaf=_is_none),
        mask_tree, params, is_leaf=_is_none,
    )
  except (ValueError, TypeError) as e:
    _, mdef = flatten_with_none(mask_tree)
    raise ValueError(
        f"`{fn}(mask=...)` must be a tree of bools with the structure of the "
        f"params (or a prefix of it), or a callable returning one; got a mask "
        f"with structure {mdef} for params with structure "
        f"{jax.tree.structure(params, is_leaf=_is_none)} ({e})"
    ) from None
  out = []
  for path, m in flatten_with_none(full)[0]:
    if m is None:  # a None param (no state): nothing to decay
      out.append(False)
      continue
    if isinstance(m, jax.core.Tracer) or np.ndim(m) != 0 or not isinstance(
        m.item() if hasattr(m, "item") else m, (bool, np.bool_)
    ):
      raise ValueError(
          f"`{fn}(mask=...)` leaves must be Python bools, got {m!r} at "
          f"{jax.tree_util.keystr(path) or '<root>'}"
      )
    out.append(bool(m))
  return out


def check_mask_arg(fn: str, mask) -> None:
  """Construction-time check of a mask: None, a callable, or a tree of bools."""
  if mask is None or callable(mask):
    return
  for path, m in flatten_with_none(mask)[0]:
    if m is not None and not isinstance(m, (bool, np.bool_)):
      raise ValueError(
          f"`{fn}(mask=...)` must be None, a callable, or a tree of Python "
          f"bools; got {m!r} at {jax.tree_util.keystr(path) or '<root>'}"
      )


def check_params_leaf(fn: str, path, leaf) -> None:
  dt = getattr(leaf, "dtype", None)
  if dt is None:
    dt = np.asarray(leaf).dtype
  if not jnp.issubdtype(dt, jnp.inexact):
    raise ValueError(
        f"`{fn}(params)` leaves must be floating or complex arrays, got dtype "
        f"{dt} at {jax.tree_util.keystr(path) or '<root>'}"
    )


Schedule = Callable[[jax.Array], Any]
