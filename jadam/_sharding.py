"""Explicit shardings (``Explicit`` mesh axes) that packing must respect.

With ``Explicit`` axes an array's type carries its sharding, and reshaping or
concatenating arrays of different shardings has no sharding JAX can infer.
Packing gathers such leaves first; the update puts its results back in the
shardings of the arrays they stand beside. With ``Auto`` axes (or none) these
are no-ops and GSPMD propagates shardings itself.
"""

from __future__ import annotations

import jax


def explicit_sharding(x):
  """The sharding ``x``'s type carries when it is split over some mesh axis, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or all(axis is None for axis in spec):
    return None
  return sharding


def replicated_if_explicit(x):
  """``x`` resharded to replicated if its type carries an explicit sharding.

  A replicated buffer slices and reshapes freely into leaves of other shapes.
  """
  sharding = explicit_sharding(x)
  if sharding is None:
    return x
  return jax.sharding.reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))


def like_sharding(x, ref):
  """``x`` resharded like ``ref`` when ``ref``'s type carries an explicit
  sharding; otherwise ``x``."""
  sharding = explicit_sharding(ref)
  return x if sharding is None else jax.sharding.reshard(x, sharding)


def fsdp_spec(shape, num_shards: int, axis_name: str) -> jax.sharding.PartitionSpec:
  """How FSDP splits an array of ``shape`` over ``num_shards`` devices of
  ``axis_name``: along its largest dimension that ``num_shards`` divides (the
  first of equal ones), or not at all (``P()``) when none does."""
  order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in order:
    if shape[d] >= num_shards and shape[d] % num_shards == 0:
      return jax.sharding.PartitionSpec(*([None] * d + [axis_name]))
  return jax.sharding.PartitionSpec()
