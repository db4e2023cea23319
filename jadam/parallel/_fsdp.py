"""``strategy="fsdp"`` (ZeRO-3): params, gradients and optimizer state all
sharded over the data axis.

Every array — a param, its gradient, and every array of the optimizer state
(moments, quantized codes and scales, packed buffers) — is split along its
largest dimension that the data-axis device count divides
(:func:`jadam._sharding.fsdp_spec`); an array with no such dimension (a
scalar, a bias of odd length) stays replicated. One rule for params and
state gives each moment its param's sharding, so the update runs where the
shards live and the step moves no state.

In the step, a ``shard_map`` all-gathers each param for the forward and
backward passes and reduce-scatters its gradient back to the param's shard
(the bytes of one all-reduce); the optimizer then updates in the global view,
element-wise on each shard where it lives (per-parameter norms reduce over
the shards). Device memory: (params + grads + state) / N,
plus the replicated leaves and the params gathered for the passes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _validate as V
from .._sharding import fsdp_spec
from ._common import PyTree
from ._common import apply_optimizer
from ._common import loss_scale
from ._common import mean_loss_and_grads
from ._common import put_params
from ._common import register_strategy
from ._common import split_local
from ._strategies import JitStrategy


def _shard_dim(spec: P) -> int | None:
  return next((d for d, a in enumerate(spec) if a is not None), None)


def _gather(x, spec: P, axis: str):
  d = _shard_dim(spec)
  return x if d is None else jax.lax.all_gather(x, axis, axis=d, tiled=True)


def _scatter(g, spec: P, axis: str, n: int):
  d = _shard_dim(spec)
  if d is None:
    return jax.lax.pmean(g, axis)
  return jax.lax.psum_scatter(g, axis, scatter_dimension=d, tiled=True) / n


@register_strategy("fsdp")
class FsdpStrategy(JitStrategy):
  """Params, gradients and optimizer state sharded over the data axis."""

  def sharding(self, x) -> NamedSharding:
    """The sharding of an array of ``x``'s shape (see the module docstring)."""
    return NamedSharding(self.sharding_mesh(), fsdp_spec(
        np.shape(x), self.config.num_shards, self.config.axis_name))

  def constrain(self, tree: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, self.sharding(x)), tree)

  def build_step(self):
    config = self.config
    axis, n = config.axis_name, config.num_shards
    split = split_local(config.accumulation_steps)

    def step(params, opt_state, batch):
      specs = jax.tree.map(lambda x: self.sharding(x).spec, params)

      def per_device(local, batch, scale):
        # Each param all-gathered for the passes; each gradient reduce-
        # scattered back to its param's shard (a replicated one: all-reduced).
        full = jax.tree.map(lambda x, s: _gather(x, s, axis), local, specs)
        loss, aux, grads = mean_loss_and_grads(config, full, batch, split, scale)
        grads = jax.tree.map(lambda g, s: _scatter(g, s, axis, n), grads, specs)
        loss, aux = jax.lax.pmean((loss, aux), axis)
        return loss, aux, grads

      # check_vma=False: the gradient is taken of the gathered values, per
      # device, and averaged by the explicit collectives above.
      loss, aux, grads = jax.shard_map(
          per_device, mesh=self.sharding_mesh(), in_specs=(specs, P(axis), P()),
          out_specs=(P(), P(), specs), check_vma=False)(params, batch, loss_scale(opt_state))
      # The update in the global view: element-wise on each shard where it
      # lives; per-parameter norms (LAMB, clipping) reduce over the shards.
      params, opt_state = apply_optimizer(config.optimizer, grads, opt_state, params)
      return self.constrain(params), self.constrain(opt_state), loss, aux

    return jax.jit(step, donate_argnums=(0, 1))

  def _check_params(self, params) -> None:
    for path, x in V.flatten_with_none(params)[0]:
      sharding = getattr(x, "sharding", None)
      spec = getattr(sharding, "spec", None)
      if spec is not None and any(a is not None for a in spec):
        raise ValueError(
            "`DataParallel(strategy='fsdp').init`: the param at "
            f"{jax.tree_util.keystr(path) or '<root>'} is already sharded ({spec}); "
            "fsdp shards every param over the data axis itself: pass it "
            "unsharded (model-sharded params need zero1/zero2 for now)")

  def init(self, params):
    self._check_params(params)
    params = jax.tree.map(lambda x: put_params(x, self.sharding(x)), params)
    state = jax.eval_shape(self.config.optimizer.init, params)
    with jax.set_mesh(self.context_mesh()):
      opt_state = jax.jit(self.config.optimizer.init,
                          out_shardings=jax.tree.map(self.sharding, state))(params)
    return params, opt_state

  def abstract_state(self, params):
    """``(params, opt_state)`` as ``init`` makes them, as
    ``jax.ShapeDtypeStruct`` with shardings (nothing is allocated)."""
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), V.dtype_of(x)), params)
    state = jax.eval_shape(self.config.optimizer.init, bare)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding(x))
    return jax.tree.map(place, bare), jax.tree.map(place, state)


__all__ = ["FsdpStrategy"]
