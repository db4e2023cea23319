"""ZeRO stages 1 and 2: the optimizer state sharded flat over the data axis.

Plain data parallelism keeps a full copy of the Adam moments on every device
(8 bytes per float32 parameter). Here each of the ``N`` devices on the data
axis keeps ``1/N`` of them, as DeepSpeed's ZeRO and Megatron's distributed
optimizer do. The layout is :mod:`._zero_layout`'s, the exchange and the
update :mod:`._zero_exchange`'s; this module holds the strategies.

Stage 1 (``"zero1"``) and stage 2 (``"zero2"``) differ only with gradient
accumulation: stage 1 sums the micro-batch gradients in a full-size local
buffer and reduce-scatters once per step; stage 2 reduce-scatters every
micro-batch's gradient and accumulates only its ``1/N`` slice (less memory,
``accumulation_steps`` reduce-scatters per step).

Gradients are taken in the global view (``jax.vmap`` of the loss over the
devices' shares, partitioned by GSPMD, so a model-parallel ``loss_fn`` needs
no collectives of its own); the exchange and the update are explicit
collectives in ``jax.shard_map``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _compose
from .. import _flat
from .. import _quant
from .. import _validate as V
from .._transformation import SLICES_ARG
from .._packed import Packed
from ._common import StepConfig
from ._common import Strategy
from ._common import auto_mesh
from ._common import check_batch
from ._common import loss_scale
from ._common import mean_loss_and_grads
from ._common import put_batch_leaf
from ._common import put_params
from ._common import register_strategy
from ._common import split_local
from ._common import to_host
from ._zero_exchange import SlicedUpdate
from ._zero_exchange import apply_and_gather
from ._zero_exchange import param_slices
from ._zero_exchange import reduce_scatter_grads
from ._zero_layout import ZeroLayout
from ._zero_layout import unpack_host
from ._zero_layout import zero_layout


class _ZeroStep:
  """The compiled step; the layout it runs in is the state's own (static
  auxiliary data of its :class:`jadam.Packed` moments), checked against the
  params' on every call."""

  def __init__(self, strategy: "ZeroStrategy"):
    self._strategy = strategy
    self._jitted = jax.jit(strategy.step_body, donate_argnums=(0, 1))

  def _check(self, params, opt_state):
    layout = self._strategy.layout_for(params, "DataParallel.step(params)")
    self._strategy.check_state(layout, opt_state)

  def __call__(self, params, opt_state, batch):
    self._check(params, opt_state)
    return self._jitted(params, opt_state, batch)

  def lower(self, params, opt_state, batch):
    self._check(params, opt_state)
    return self._jitted.lower(params, opt_state, batch)


class ZeroStrategy(Strategy):
  """ZeRO data parallelism: params replicated over the data axis, optimizer
  state (stage 1) and reduced gradients (stage 2) sharded flat over it.

  Needs a jadam optimizer (``jadam.adam``, ``adamw``, ``amsgrad``,
  ``adamax(w)``, ``nadam(w)``, ``radam``, ``lamb``), bare or inside
  ``optax.chain`` / ``optax.apply_if_finite`` with transformations that mean
  the same on packed slices as on the params' tree: elementwise ones
  (``optax.clip``, ``scale``, unmasked ``add_decayed_weights``, ...) and
  ``optax.clip_by_global_norm`` (see :mod:`jadam._compose`). The whole
  optimizer runs in the global view on the packed slices, each a global
  buffer sharded over the data axis (GSPMD sums a global norm over the slices
  with one all-reduce of a scalar); the jadam optimizer applies its rule to
  each device's slice.
  """

  stage: int = 0

  def __init__(self, config: StepConfig):
    super().__init__(config)
    name = f"zero{self.stage}"
    self.mesh = auto_mesh(config.mesh)
    parts = _compose.parts(config.optimizer)
    if len(parts.jadam) != 1:
      raise ValueError(
          f"`DataParallel(strategy={name!r})` needs a jadam optimizer "
          "(jadam.adam, jadam.adamw, jadam.amsgrad, jadam.lamb, ...) whose "
          "rule it applies to each device's slice of the state, bare or in an "
          f"optax.chain; got {config.optimizer!r} with "
          f"{len(parts.jadam)} jadam optimizers (for other optax "
          "transformations use strategy='shard_map', 'jit' or 'pmap')")
    if parts.unknown():
      raise ValueError(
          f"`DataParallel(strategy={name!r})` runs the optimizer on packed "
          "slices of the params, where only elementwise transformations and "
          "optax.clip_by_global_norm mean what they mean on the params' tree; "
          f"the optimizer also has {parts.unknown()} (for those use "
          "strategy='shard_map', 'jit' or 'pmap')")
    others = {a: n for a, n in self.mesh.shape.items() if a != config.axis_name and n > 1}
    if parts.has_global() and others:
      raise ValueError(
          f"`DataParallel(strategy={name!r})`: a global norm over packed slices "
          f"needs a mesh with only the data axis; this mesh also has {others} "
          "(params replicated there would be counted once per position)")

  # -- layout

  def context_mesh(self) -> Mesh:
    return self.mesh

  def layout_for(self, params, fn: str = "DataParallel.init") -> ZeroLayout:
    """The sharded flat layout of ``params`` (a pure query)."""
    # Quantized moments: slices of whole blocks, small leaves kept apart.
    _, block, small_leaf = _flat.optimizer_packing(self.config.optimizer)
    return zero_layout(params, self.mesh, self.config.axis_name, fn, block, small_leaf)

  def param_sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def _slices_template(self, layout: ZeroLayout) -> Packed:
    return Packed(layout, {b.key: jax.ShapeDtypeStruct(layout.buffer_shape(b.key), b.dtype)
                           for b in layout.flat.buffers})

  def state_shape_dtypes(self, layout: ZeroLayout):
    """The optimizer state as ``ShapeDtypeStruct`` with shardings: the
    optimizer's own state for the packed slices, its packed buffers sharded
    like the slices, everything else (counts, scalars) replicated."""
    state = jax.eval_shape(self.config.optimizer.init, self._slices_template(layout))
    sliced = NamedSharding(self.mesh, layout.state_spec)
    replicated = NamedSharding(self.mesh, P())

    def place(x):
      if isinstance(x, Packed):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sliced), x)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, Packed))

  def abstract_state(self, params):
    """``(params, opt_state)`` as ``init`` would make them, as
    ``jax.ShapeDtypeStruct`` with shardings (nothing is allocated)."""
    layout = self.layout_for(params)
    flat, treedef = V.flatten_with_none(params)
    leaves = [None if x is None else jax.ShapeDtypeStruct(
        np.shape(x), V.dtype_of(x), sharding=self.param_sharding(s))
              for (_, x), s in zip(flat, layout.specs)]
    return treedef.unflatten(leaves), self.state_shape_dtypes(layout)

  def check_state(self, layout: ZeroLayout, opt_state) -> None:
    want = self.state_shape_dtypes(layout)
    same = jax.tree.structure(opt_state) == jax.tree.structure(want) and all(
        np.shape(x) == w.shape for x, w in zip(jax.tree.leaves(opt_state), jax.tree.leaves(want)))
    if not same:
      got = [x.layout for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, Packed))
             if isinstance(x, Packed)]
      why = ("its packed buffers are of another params layout" if got
             else "it has no packed buffers")
      raise ValueError(
          f"`DataParallel.step(opt_state=...)` must be the zero{self.stage} "
          f"state of these params (from trainer.init, a previous step or a "
          f"restore into trainer.abstract_state()); {why}: expected "
          f"{jax.tree.map(np.shape, want)}, got {jax.tree.map(np.shape, opt_state)}")

  # -- Strategy

  def init(self, params):
    layout = self.layout_for(params)
    flat, treedef = V.flatten_with_none(params)
    placed = []
    for (_, x), s in zip(flat, layout.specs):
      if x is None:
        placed.append(None)
      elif s == P():
        placed.append(put_params(x, self.param_sharding(P())))
      else:
        placed.append(put_params(x, self.param_sharding(s)))
    params = treedef.unflatten(placed)
    want = self.state_shape_dtypes(layout)
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(
          lambda: self.config.optimizer.init(jax.tree.map(
              lambda s: jnp.zeros(s.shape, s.dtype), self._slices_template(layout))),
          out_shardings=jax.tree.map(lambda s: s.sharding, want))()
    return params, opt_state

  def place_batch(self, batch):
    check_batch(self.config, batch)
    sharding = NamedSharding(self.mesh, P(self.config.axis_name))
    return jax.tree.map(lambda x: put_batch_leaf(x, sharding), batch)

  def gather(self, tree):
    def leaf(x):
      if isinstance(x, Packed) and isinstance(x.layout, ZeroLayout):
        # Sharded moments unpack with the layout they carry (quantized ones
        # decoded: the gathered tree holds the moments' values).
        return unpack_host(x.layout, self.mesh, {
            k: np.asarray(_quant.decode(jax.tree.map(to_host, v)))
            for k, v in x.items()})
      return to_host(x)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, Packed))

  def build_step(self):
    return _ZeroStep(self)

  # -- the step

  def local_grads(self, config: StepConfig, layout: ZeroLayout, params, batch, scale=None):
    """Each device's mean loss, aux and gradient over its share of ``batch``
    (leaves ``(N, share, ...)``), in the global view: a ``vmap`` over the
    devices that GSPMD keeps on each device (``scale``: the loss scale, or
    ``None``)."""
    axis = config.axis_name
    k = config.accumulation_steps
    split = split_local(k)
    loss, aux, grads = jax.vmap(
        lambda b: mean_loss_and_grads(config, params, b, split, scale))(batch)
    flat_grads, treedef = V.flatten_with_none(grads)
    grads = treedef.unflatten([
        None if g is None else jax.lax.with_sharding_constraint(
            g, NamedSharding(self.mesh, P(axis, *s)))
        for (_, g), s in zip(flat_grads, layout.specs)])
    return loss, aux, grads

  def split_batch(self, batch, k: int = 1):
    """``(B, ...)`` -> ``(N, B // N, ...)``, or ``(k, N, B // (N k), ...)``,
    each device keeping its own rows."""
    n, axis = self.config.num_shards, self.config.axis_name

    def split(x):
      share = x.shape[0] // n
      x = x.reshape((n, share) + x.shape[1:])
      if k == 1:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, P(axis)))
      x = x.reshape((n, k, share // k) + x.shape[2:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(self.mesh, P(None, axis)))

    return jax.tree.map(split, batch)

  def reduced_grads(self, layout: ZeroLayout, params, batch, scale=None):
    """``(device_losses, aux, grad_slices)``: each device's mean loss over its
    share (shape ``(N,)``), the mean aux over the batch and each device's
    slice of the mean gradient (stage 1: one reduce-scatter of the
    accumulated gradient)."""
    losses, aux, grads = self.local_grads(self.config, layout, params,
                                          self.split_batch(batch), scale)
    slices = reduce_scatter_grads(layout, self.mesh, grads)
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)
    return losses, aux, slices

  def step_body(self, params, opt_state, batch):
    layout = _state_layout(opt_state)
    losses, aux, slices = self.reduced_grads(layout, params, batch, loss_scale(opt_state))
    p_slices = param_slices(layout, self.mesh, params)
    sliced = SlicedUpdate(layout, self.mesh, losses)
    updates, opt_state = self.config.optimizer.update(
        Packed(layout, slices), opt_state, p_slices, **{SLICES_ARG: sliced})
    if sliced.calls != 1:
      raise ValueError(
          f"zero{self.stage}: the jadam optimizer inside the optimizer was "
          f"called {sliced.calls} times in one step (once expected); does a "
          "wrapper drop the extra argument `jadam_slices`?")
    # Under skip_nonfinite the update averaged the losses with its flag.
    loss = sliced.mean_loss if sliced.mean_loss is not None else jnp.mean(losses, axis=0)
    params = apply_and_gather(layout, self.mesh, p_slices, updates)
    return params, opt_state, loss, aux


def _state_layout(opt_state) -> ZeroLayout:
  for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, Packed)):
    if isinstance(x, Packed) and isinstance(x.layout, ZeroLayout):
      return x.layout
  raise ValueError("`DataParallel.step(opt_state=...)` has no ZeRO-sharded buffers")


@register_strategy("zero1")
class Zero1Strategy(ZeroStrategy):
  """ZeRO stage 1: optimizer state sharded flat over the data axis; the
  gradient, accumulated over micro-batches in a full-size local buffer, is
  reduce-scattered once per step."""

  stage = 1


@register_strategy("zero2")
class Zero2Strategy(ZeroStrategy):
  """ZeRO stage 2: as stage 1, and every micro-batch's gradient is
  reduce-scattered at once, so the accumulated gradient is kept only as each
  device's ``1/N`` slice (``accumulation_steps`` reduce-scatters per step)."""

  stage = 2

  def reduced_grads(self, layout, params, batch, scale=None):
    k = self.config.accumulation_steps
    if k == 1:
      return super().reduced_grads(layout, params, batch, scale)
    config = dataclasses.replace(self.config, accumulation_steps=1)
    micro = self.split_batch(batch, k)

    def one(acc, micro_batch):
      loss, aux, grads = self.local_grads(config, layout, params, micro_batch, scale)
      slices = reduce_scatter_grads(layout, self.mesh, grads)
      acc = jax.tree.map(lambda a, s: a + s.astype(a.dtype), acc, slices)
      # Per-device values: averaged once after the loop, not once per
      # micro-batch (each mean over devices is an all-reduce).
      return acc, (loss, aux)

    sharding = NamedSharding(self.mesh, layout.state_spec)
    acc = {b.key: jax.lax.with_sharding_constraint(
        jnp.zeros(layout.buffer_shape(b.key),
                  jnp.promote_types(b.dtype, jnp.float32)), sharding)
           for b in layout.flat.buffers}
    acc, (losses, auxes) = jax.lax.scan(one, acc, micro)
    slices = {b.key: (acc[b.key] / k).astype(b.dtype) for b in layout.flat.buffers}
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=(0, 1)), auxes)
    return jnp.mean(losses, axis=0), aux, slices
