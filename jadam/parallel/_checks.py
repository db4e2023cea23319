"""Checks of what a user hands the trainer: ``loss_fn``'s output, donated
arrays, and params / optimizer state that do not match the trainer's layout.

Each check turns what would otherwise be a crash (a step given arrays an
earlier step donated ends the process with SIGSEGV on several devices) or an
error from deep inside JAX into an exception naming the argument and what was
expected. The checks on the hot path cost one ``is_deleted()`` call per leaf;
the layout diagnosis runs only after a step has failed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate as V

PyTree = Any


def _where(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def loss_output(out, has_aux: bool):
  """``(loss, aux)`` from what ``loss_fn`` returned (traced); raises a
  TypeError naming ``loss_fn`` unless ``loss`` is a float scalar and, with
  ``has_aux``, ``out`` is a pair."""
  if has_aux:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
      got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list))
             else _describe(out))
      raise TypeError(
          "with has_aux=True, `loss_fn(params, batch)` must return a pair "
          f"`(loss, aux)`, got {got}")
    loss, aux = out
  else:
    if isinstance(out, (tuple, list)):
      raise TypeError(
          f"`loss_fn(params, batch)` returned a {type(out).__name__} of "
          f"{len(out)}; it must return the loss alone (a float scalar), or "
          "pass has_aux=True to DataParallel if it returns `(loss, aux)`")
    loss, aux = out, None
  shape = np.shape(loss)
  dtype = getattr(loss, "dtype", None)
  dtype = np.asarray(loss).dtype if dtype is None and not shape else dtype
  if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        "`loss_fn(params, batch)` must return the loss as a float scalar (the "
        f"mean over its batch), got {_describe(loss)}"
        + (" (each device calls loss_fn on its own share of the batch, and "
           "the trainer averages the scalars)" if shape else "")
        + (" (cast it, e.g. `.astype(jnp.float32)`)" if not shape else ""))
  return loss, aux


def _describe(x) -> str:
  shape, dtype = np.shape(x), getattr(x, "dtype", None)
  if dtype is None:
    return f"a {type(x).__name__}" + (f" of shape {shape}" if shape else "")
  return f"an array of shape {tuple(shape)} and dtype {np.dtype(dtype).name}"


def live(params: PyTree, opt_state: PyTree) -> None:
  """Raises a ValueError if any array of ``params`` or ``opt_state`` was
  deleted, e.g. donated to an earlier step (running on it would crash)."""
  for name, tree in (("params", params), ("opt_state", opt_state)):
    leaves = jax.tree.leaves(tree)
    if not any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves):
      continue
    path = next(_where(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
                if isinstance(x, jax.Array) and x.is_deleted())
    raise ValueError(
        f"`DataParallel.step({name}=...)`: the array at {name}{path} was "
        "deleted: its buffers were donated to an earlier `step` (or deleted). "
        "Pass the params and opt_state that the last `step` returned: "
        "`params, opt_state, loss = trainer.step(params, opt_state, batch)`")


def mismatch(name: str, given: PyTree, expected: PyTree) -> str | None:
  """How ``given`` differs from ``expected`` (``jax.ShapeDtypeStruct``
  leaves) in structure, shape or dtype, or ``None`` if it does not."""
  given_leaves, given_def = jax.tree_util.tree_flatten_with_path(given)
  want_leaves, want_def = jax.tree_util.tree_flatten_with_path(expected)
  if given_def != want_def:
    got = {_where(p) for p, _ in given_leaves}
    want = {_where(p) for p, _ in want_leaves}
    missing, extra = sorted(want - got)[:3], sorted(got - want)[:3]
    detail = (f"; missing {missing}" if missing else "") + (
        f"; unexpected {extra}" if extra else "")
    return (f"`{name}` does not have the structure this trainer's `init` "
            f"returned{detail or f': expected {want_def}, got {given_def}'}")
  for (path, x), (_, w) in zip(given_leaves, want_leaves):
    shape, dtype = tuple(np.shape(x)), V.dtype_of(x)
    if shape != tuple(w.shape) or dtype != np.dtype(w.dtype):
      return (f"`{name}{_where(path)}` has shape {shape} and dtype "
              f"{np.dtype(dtype).name}; this trainer's layout expects "
              f"{tuple(w.shape)} {np.dtype(w.dtype).name}")
  return None


def params(tree: PyTree) -> None:
  """Raises a ValueError unless ``tree`` (``DataParallel.init``'s params)
  has at least one leaf and every leaf is a numeric array."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves:
    raise ValueError("`DataParallel.init(params=...)` must contain at least one "
                     f"array to train, got {tree!r}")
  for path, x in leaves:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
      try:
        dtype = np.asarray(x).dtype
      except Exception:  # pylint: disable=broad-except
        dtype = np.dtype(object)
    if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
      raise ValueError(
          f"`DataParallel.init(params=...)`: the leaf at {_where(path)} must "
          f"be an array, got {type(x).__name__} {x!r:.60}")
