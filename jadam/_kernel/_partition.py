"""The kernel's call under GSPMD: a ``custom_partitioning`` rule that runs it
on each device's shard of every leaf.

The step is element-wise within a leaf: its gradient, moments, master state,
param and result all have the leaf's shape, so each device can update the
elements it holds, as long as every array of a leaf is split alike. The rule
gives each leaf's arrays its gradient's sharding (the partitioner reshards
any other operand to it) and keeps the step's scalars and flag replicated.
Only what has no cross-element term is partitioned this way: not LAMB (its
trust ratio is a norm over the whole leaf), not block-wise quantized moments
(a block may straddle two shards), not a weight decay mask within a leaf, and
not a flag read by the kernel itself (each device would see only its shard:
the caller reduces it over the whole gradient first).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def elementwise(build: Callable, args: Sequence[jax.Array], leaf_of_arg: Sequence[int | None],
                leaf_of_out: Sequence[int | None]):
  """``build(shapes)(*args)`` partitioned leaf by leaf.

  Args:
    build: called with the arrays' shapes (global, or one device's shard),
      returns the function of those arrays (the kernel's call: its
      attributes may depend on the sizes it sees).
    args: the call's arrays.
    leaf_of_arg: per argument, the index of the leaf whose shape it has, or
      ``None`` (replicated: the step's scalars).
    leaf_of_out: the same for the results.
  """
  first = {}
  for i, j in enumerate(leaf_of_arg):
    if j is not None:
      first.setdefault(j, i)  # the leaf's gradient: its first argument

  def shardings(mesh, arg_shapes):
    replicated = NamedSharding(mesh, P())
    leaf = {j: arg_shapes[i].sharding for j, i in first.items()}
    pick = lambda j: replicated if j is None else leaf[j]  # pylint: disable=unnecessary-lambda-assignment
    return [pick(j) for j in leaf_of_arg], [pick(j) for j in leaf_of_out]

  def run(*xs):  # on the global arrays when traced, on one device's shards when lowered
    return tuple(build([x.shape for x in xs])(*xs))

  call = custom_partitioning(run)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return tuple(shardings(mesh, arg_shapes)[1])

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    arg_shardings, out_shardings = shardings(mesh, arg_shapes)
    return mesh, run, tuple(out_shardings), tuple(arg_shardings)

  call.def_partition(partition, infer_sharding_from_operands=infer,
                     sharding_rule=_rule(args, leaf_of_arg, leaf_of_out),
                     need_replication_factors=("s",))
  return call(*args)


def _rule(args, leaf_of_arg, leaf_of_out) -> str:
  """The Shardy rule: every dimension of leaf j is a factor ``l{j}d{k}``
  shared by all its arrays; the scalars' one dimension, ``s``, replicated."""
  rank = {j: len(args[i].shape) for i, j in enumerate(leaf_of_arg) if j is not None}

  def spec(j, x=None):
    if j is None:
      return "s" if x is not None and len(x.shape) == 1 else ""
    return " ".join(f"l{j}d{k}" for k in range(rank[j]))

  ins = ", ".join(spec(j, x) for j, x in zip(leaf_of_arg, args))
  outs = ", ".join(spec(j) if j is not None else "" for j in leaf_of_out)
  return f"{ins} -> {outs}"
