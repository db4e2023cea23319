"""What an optax transformation is made of, seen through optax's wrappers.

Strategies that run an optimizer on packed slices of the params (ZeRO) must
know that every part of it means the same there as on the params' tree: the
jadam optimizer (which receives the slices' layout and applies its rule, masks
and per-parameter norms slice by slice), elementwise transformations, and
global reductions over all leaves (``optax.clip_by_global_norm``: the padding
is zero and every element appears once). A per-leaf statistic
(``clip_by_block_rms``, ``scale_by_trust_ratio``, a masked transformation)
would silently mean something else on a packed buffer, so it is refused.

optax keeps no description of a composed transformation, so the parts are
found by identity: a transformation's ``update`` function is compared (its
code object) with those of the optax constructors named below, and a wrapper's
inner transformations are read from its closure. Anything not recognised is
reported by name: refused, never guessed.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import optax

_JADAM_SPECS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def register_jadam(tx, spec) -> None:
  """Records that ``tx`` is a jadam optimizer with ``spec`` (by the identity of
  its ``update`` function, which optax's wrappers keep a reference to)."""
  _JADAM_SPECS[tx.update] = spec


def _code(tx) -> Any:
  return getattr(getattr(tx, "update", None), "__code__", None)


def _noop():
  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda updates, state, params=None: (updates, state))


# Transformations that mean the same on packed slices as on the tree. "global":
# a reduction over all leaves (GSPMD sums it over the slices).
_SAFE = {
    _code(optax.clip_by_global_norm(1.0)): "global",
    _code(optax.clip(1.0)): "elementwise",
    _code(optax.scale(1.0)): "elementwise",
    _code(optax.identity()): "elementwise",
    _code(optax.add_decayed_weights(1.0)): "elementwise",  # unmasked only: a mask wraps it
    _code(optax.scale_by_schedule(lambda count: 1.0)): "elementwise",
    _code(optax.keep_params_nonnegative()): "elementwise",
}
# Wrappers: code -> the closure variables that hold the inner transformations.
_WRAPPERS = {
    _code(optax.chain(optax.identity())): "update_fns",
    _code(optax.with_extra_args_support(_noop())): "tx",
    _code(optax.apply_if_finite(optax.identity(), 1)): "inner",
}


def register_wrapper(tx, inner_var: str) -> None:
  """Records that transformations made like ``tx`` wrap another one, held in
  their update function's closure variable ``inner_var`` (for wrappers
  jadam defines itself, such as loss scaling)."""
  _WRAPPERS[_code(tx)] = inner_var


@dataclasses.dataclass(frozen=True)
class Parts:
  """The parts of an optimizer, in order.

  Attributes:
    jadam: the specs of the jadam optimizers found.
    others: ``(name, kind)`` of every other part: ``"elementwise"``,
      ``"global"``, or ``"unknown"``.
    wrappers: the names of the wrappers seen through (``"chain"``,
      ``"apply_if_finite"``, ...).
  """

  jadam: tuple
  others: tuple
  wrappers: tuple = ()

  def unknown(self) -> list[str]:
    return [name for name, kind in self.others if kind == "unknown"]

  def has_global(self) -> bool:
    return any(kind == "global" for _, kind in self.others)


def _closure(fn) -> dict[str, Any]:
  names = fn.__code__.co_freevars
  return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


def _inner(tx, var: str) -> list:
  value = _closure(tx.update).get(var)
  if var == "update_fns":  # optax.chain keeps update functions, not transformations
    return [optax.GradientTransformationExtraArgs(None, f) for f in value or ()]
  return [] if value is None else [value]


def parts(tx) -> Parts:
  """The parts of ``tx`` (see the module docstring)."""
  jadam, others, wrappers = [], [], []

  def walk(t):
    update = getattr(t, "update", None)
    spec = _JADAM_SPECS.get(update) if update is not None else None
    if spec is not None:
      jadam.append(spec)
      return
    code = _code(t)
    if code in _WRAPPERS:
      wrappers.append(update.__qualname__.split(".<locals>")[0])
      for inner in _inner(t, _WRAPPERS[code]):
        walk(inner)
      return
    name = getattr(update, "__qualname__", type(t).__name__).split(".<locals>")[0]
    others.append((name, _SAFE.get(code, "unknown")))

  walk(tx)
  return Parts(tuple(jadam), tuple(others), tuple(wrappers))


def jadam_spec(tx):
  """The spec of the one jadam optimizer inside ``tx`` (through optax's
  wrappers), or ``None``."""
  found = parts(tx).jadam
  return found[0] if len(found) == 1 else None
