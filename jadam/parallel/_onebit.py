"""``strategy=OneBit(warmup_steps=W)``: 1-bit Adam (Tang et al. 2021).

The first ``W`` steps are exactly ``"shard_map"``'s: the gradient is
all-reduced and the jadam optimizer takes its usual step. From step ``W + 1``
on, ``nu`` is frozen (Adam's variance settles early in training; the rule
keeps ``nu`` and its bias correction as of step ``W``), and what the devices
exchange is the momentum instead of the gradient: each device forms its local
momentum ``b1 mu + (1 - b1) g_i`` from its own gradient, and
:mod:`._sign_exchange` averages these compressed to one bit per element with
error feedback on both sides (a packed all-to-all and a packed all-gather:
1/32 of an all-reduce's bytes). The rule then runs on the gradient whose
moment update gives that mean momentum, so every jadam optimizer (adam, adamw,
nadam, radam, amsgrad, adamax, lamb; tree or flat layout, float or quantized
moments) runs its own step with the exchanged momentum and frozen ``nu``, and
every device stays in sync.

Layout: params and the optimizer's state are replicated, as in
``"shard_map"``; the state is a :class:`OneBitState` that adds the step count
and the error feedback (a full-size worker buffer per device, one chunk of
server buffer per device: ``4 (1 + 1/N)`` bytes per parameter).

The step is compiled once per phase; which one runs is chosen on the host
from the state's step count (kept on the host between steps, read from the
device only for a state the trainer did not just return).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from .. import _compose
from .. import _validate as V
from .._packed import Packed
from .._transformation import EXCHANGE_ARG
from ._common import PyTree
from ._common import apply_optimizer
from ._common import loss_scale
from ._common import mean_loss_and_grads
from ._common import register_strategy
from ._common import split_local
from ._common import to_host
from ._sign_exchange import SignExchange
from ._sign_exchange import padded_size
from ._strategies import _OwnState


@dataclasses.dataclass(frozen=True)
class OneBit:
  """Options of the 1-bit Adam strategy.

  Args:
    warmup_steps: steps of exact Adam (full all-reduce) before ``nu``
      freezes and the momentum is exchanged compressed; a positive integer.
      DeepSpeed advises 15-25% of the run; ``"onebit"`` means
      ``OneBit()``, 1000 steps.
  """

  warmup_steps: int = 1000
  name = "onebit"

  def __post_init__(self):
    object.__setattr__(self, "warmup_steps",
                       V.check_positive_int("OneBit", "warmup_steps", self.warmup_steps))


class OneBitState(NamedTuple):
  """The state of the 1-bit Adam strategy.

  Attributes:
    count: int32, steps taken (with ``skip_nonfinite``, a skipped step does
      not count: the warm-up is ``warmup_steps`` steps that updated ``nu``).
    inner: the trainer's optimizer's state (replicated).
    worker_error: ``(N, P)`` float32, each device's worker error feedback
      over the flat momentum (split over the data axis).
    server_error: ``(N, P / N)`` float32, each device's server error
      feedback over its chunk (split over the data axis).
  """

  count: jax.Array
  inner: PyTree
  worker_error: jax.Array
  server_error: jax.Array


class _PhasedStep:
  """The step: the warm-up program for the first ``warmup_steps`` steps,
  then the compressed one."""

  def __init__(self, strategy: "OneBitStrategy"):
    self._strategy = strategy
    self._programs = {}
    # The count array the last step returned, and bounds of its value (a step
    # skipped under skip_nonfinite does not count: the value is then only
    # known to lie between them).
    self._last = (None, 0, 0)

  def _count_bounds(self, opt_state) -> tuple[int, int]:
    last, low, high = self._last
    warmup = self._strategy.options.warmup_steps
    if opt_state.count is last and (high < warmup or low >= warmup):
      return low, high
    value = int(to_host(opt_state.count))  # a new state, or near the warm-up's end
    return value, value

  def _program(self, bounds: tuple[int, int]):
    compressed = bounds[0] >= self._strategy.options.warmup_steps
    if compressed not in self._programs:
      self._programs[compressed] = self._strategy.build_phase(compressed)
    return self._programs[compressed]

  def __call__(self, params, opt_state, batch):
    low, high = self._count_bounds(opt_state)
    out = self._program((low, high))(params, opt_state, batch)
    self._last = (out[1].count, low + (0 if self._strategy.skips else 1), high + 1)
    return out

  def lower(self, params, opt_state, batch):
    return self._program(self._count_bounds(opt_state)).lower(params, opt_state, batch)


@register_strategy("onebit")
class OneBitStrategy(_OwnState):
  """Exact Adam for the warm-up, then 1-bit compressed momentum with frozen
  ``nu`` (see the module docstring)."""

  def __init__(self, config):
    super().__init__(config)
    parts = _compose.parts(config.optimizer)
    spec = parts.jadam[0] if len(parts.jadam) == 1 else None
    if spec is None:
      raise ValueError(
          "`DataParallel(strategy=OneBit(...))` needs one jadam optimizer "
          "(bare or in an optax chain): 1-bit Adam freezes its nu after the "
          f"warm-up; got {config.optimizer!r}")
    # After the warm-up each device's optimizer sees its own gradient: a part
    # that decides or keeps state on it would tell the devices apart.
    if "apply_if_finite" in parts.wrappers or parts.unknown():
      raise ValueError(
          "`DataParallel(strategy=OneBit(...))` takes a jadam optimizer, bare or in an "
          "optax.chain of elementwise transformations and clip_by_global_norm; got "
          f"{', '.join(parts.unknown() + [w for w in parts.wrappers if w == 'apply_if_finite'])}"
          " (for skipping non-finite steps, pass skip_nonfinite=True to the jadam "
          "optimizer: every device then skips alike)")
    self.skips = spec.rule.skip_nonfinite  # whether a step may be skipped

  @property
  def options(self) -> OneBit:
    return self.config.options or OneBit()

  def _sizes(self, params) -> tuple[int, int]:
    """Elements of the flat momentum: not padding, and padded."""
    if isinstance(params, Packed):  # DataParallel(layout="flat"): the leaves
      params = params.layout.tree_shape_dtypes()
    size = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
    return size, padded_size(size, self.config.num_shards)

  def _initial(self, params) -> OneBitState:
    n = self.config.num_shards
    _, padded = self._sizes(params)
    return OneBitState(jnp.zeros([], jnp.int32), self.config.optimizer.init(params),
                       jnp.zeros((n, padded), jnp.float32),
                       jnp.zeros((n, padded // n), jnp.float32))

  def _state_shardings(self, state) -> OneBitState:
    replicated = self.replicated()
    return OneBitState(replicated, jax.tree.map(lambda _: replicated, state.inner),
                       self.split(), self.split())

  def build_step(self):
    return _PhasedStep(self)

  def build_phase(self, compressed: bool):
    """The compiled step of one phase."""
    config = self.config
    axis, n = config.axis_name, config.num_shards
    split = split_local(config.accumulation_steps)
    optimizer = config.optimizer

    def per_device(params, state, batch):
      loss, aux, grads = mean_loss_and_grads(config, params, batch, split,
                                             loss_scale(state.inner))
      worker_error, server_error = state.worker_error, state.server_error
      if not compressed:  # "shard_map"'s step
        loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis)
        params, inner = apply_optimizer(optimizer, grads, state.inner, params)
      else:
        loss, aux = jax.lax.pmean((loss, aux), axis)
        exchange = SignExchange(axis, n, self.options.warmup_steps,
                                worker_error[0], server_error[0])
        updates, inner = optimizer.update(grads, state.inner, params,
                                          **{EXCHANGE_ARG: exchange})
        if exchange.calls != 1:
          raise ValueError(
              "`DataParallel(strategy=OneBit(...))`: the jadam optimizer was "
              f"called {exchange.calls} times in one step (once expected); "
              "does a wrapper drop the extra argument `jadam_momentum_exchange`?")
        params = optax.apply_updates(params, updates)
        worker_error = exchange.worker_error[None]
        server_error = exchange.server_error[None]
      taken = optax.tree.get(inner, "last_finite", True) if self.skips else True
      return params, OneBitState(state.count + jnp.asarray(taken, jnp.int32), inner,
                                 worker_error,
                                 server_error), loss, aux

    specs = OneBitState(P(), P(), P(axis), P(axis))
    # check_vma=False: the gradient is each device's own (its share of the
    # batch); the explicit collectives above are the only exchange.
    step = jax.shard_map(per_device, mesh=self.sharding_mesh(),
                         in_specs=(P(), specs, P(axis)),
                         out_specs=(P(), specs, P(), P()), check_vma=False)
    return jax.jit(step, donate_argnums=(0, 1))


__all__ = ["OneBit", "OneBitState", "OneBitStrategy"]
