"""``strategy=LocalSteps(inner_steps=H)`` (DiLoCo, Douillard et al. 2023):
each device trains its own replica for ``H`` steps, then the replicas meet.

Every device (one replica) takes ``H`` inner steps of the trainer's optimizer
on its own share of each batch, with its own inner optimizer state and no
communication. At every ``H``-th step the replicas' deltas from the global
params (the *outer gradient*, ``global - replica``) are averaged with one
all-reduce, the outer optimizer (default: SGD with Nesterov momentum 0.9 and
learning rate 0.7, DiLoCo's) applies them to the global params, and every
replica continues from the new global params. No device waits for another
between outer steps: this is the SPMD form of asynchronous training.

Layout: ``params`` (what ``init`` and ``step`` return, and ``gather`` reads)
are the global params, replicated; the optimizer state is a
:class:`LocalStepsState` with the step count, the replicas and their inner
states (a leading device axis, split over the data axis) and the outer
optimizer's state. The loss ``step`` returns is the mean of the replicas'
losses on their shares (one scalar all-reduce per step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from .. import _validate as V
from .._optax_state import reset_master
from ._common import PyTree
from ._common import apply_optimizer
from ._common import loss_scale
from ._common import mean_loss_and_grads
from ._common import register_strategy
from ._common import split_local
from ._strategies import _OwnState


@dataclasses.dataclass(frozen=True)
class LocalSteps:
  """Options of the local-steps (DiLoCo) strategy.

  Args:
    inner_steps: ``H``, the inner steps each replica takes between two
      outer steps (a positive integer).
    outer_optimizer: the optax optimizer of the outer step, applied to the
      averaged ``global - replica`` deltas; ``None``: ``optax.sgd(0.7,
      momentum=0.9, nesterov=True)`` (DiLoCo's). ``optax.sgd(1.0)`` is plain
      averaging of the replicas.
  """

  inner_steps: int = 8
  outer_optimizer: Any = None
  name = "local"

  def __post_init__(self):
    object.__setattr__(self, "inner_steps",
                       V.check_positive_int("LocalSteps", "inner_steps", self.inner_steps))
    tx = self.outer_optimizer
    if tx is not None and not (callable(getattr(tx, "init", None))
                               and callable(getattr(tx, "update", None))):
      raise ValueError(
          "`LocalSteps(outer_optimizer=...)` must be None or an optax "
          f"GradientTransformation, got {tx!r}")

  def outer(self) -> optax.GradientTransformation:
    if self.outer_optimizer is not None:
      return self.outer_optimizer
    return optax.sgd(0.7, momentum=0.9, nesterov=True)


class LocalStepsState(NamedTuple):
  """The state of the local-steps strategy.

  Attributes:
    count: int32, steps taken (an outer step follows every ``H``-th).
    replicas: each device's params (a leading device axis).
    inner: each device's state of the trainer's optimizer (leading axis).
    outer: the outer optimizer's state (replicated).
  """

  count: jax.Array
  replicas: PyTree
  inner: PyTree
  outer: PyTree


@register_strategy("local")
class LocalStepsStrategy(_OwnState):
  """``H`` local steps per replica, then one averaged outer step."""

  # Collectives under the step's conditional (the outer step) run once every
  # ``H`` steps: jadam.parallel.comm_bytes averages them over the period.
  @property
  def branch_weight(self) -> float:
    return 1.0 / self.options.inner_steps

  @property
  def options(self) -> LocalSteps:
    return self.config.options or LocalSteps()

  def _initial(self, params) -> LocalStepsState:
    """The state ``init`` makes: every replica the params, a fresh inner state
    each, the outer optimizer's state."""
    stack = lambda tree: jax.tree.map(self.per_device_copies, tree)
    return LocalStepsState(jnp.zeros([], jnp.int32), stack(params),
                           stack(self.config.optimizer.init(params)),
                           self.options.outer().init(params))

  def _state_shardings(self, state) -> LocalStepsState:
    split, replicated = self.split(), self.replicated()
    return LocalStepsState(
        replicated, jax.tree.map(lambda _: split, state.replicas),
        jax.tree.map(lambda _: split, state.inner),
        jax.tree.map(lambda _: replicated, state.outer))

  def build_step(self):
    config = self.config
    axis = config.axis_name
    h = self.options.inner_steps
    outer_tx = self.options.outer()
    split = split_local(config.accumulation_steps)

    def per_device(params, state, batch):
      replica = jax.tree.map(lambda x: x[0], state.replicas)
      inner = jax.tree.map(lambda x: x[0], state.inner)
      loss, aux, grads = mean_loss_and_grads(config, replica, batch, split,
                                             loss_scale(inner))
      replica, inner = apply_optimizer(config.optimizer, grads, inner, replica)
      count = state.count + 1

      def outer_step(args):
        anchor, _, outer, inner = args
        # The outer gradient: how far the replicas moved, averaged.
        delta = jax.lax.pmean(jax.tree.map(jnp.subtract, anchor, replica), axis)
        anchor, outer = apply_optimizer(outer_tx, delta, outer, anchor)
        # Every replica restarts from the new params, which are exact: master
        # weights (if any) start again from them.
        return anchor, anchor, outer, reset_master(inner)

      params, replica, outer, inner = jax.lax.cond(
          count % h == 0, outer_step, lambda args: args,
          (params, replica, state.outer, inner))
      loss, aux = jax.lax.pmean((loss, aux), axis)
      stack = lambda x: x[None]
      return params, LocalStepsState(count, jax.tree.map(stack, replica),
                                     jax.tree.map(stack, inner), outer), loss, aux

    specs = LocalStepsState(P(), P(axis), P(axis), P())
    # check_vma=False: each replica is differentiated on its own share; the
    # only exchange is the explicit pmean of the outer step (and the loss).
    step = jax.shard_map(per_device, mesh=self.sharding_mesh(),
                         in_specs=(P(), specs, P(axis)),
                         out_specs=(P(), specs, P(), P()), check_vma=False)
    return jax.jit(step, donate_argnums=(0, 1))
