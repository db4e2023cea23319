"""The data-parallel strategies: ``pmap``, ``shard_map`` and ``jit``.

All three keep a full replica of params and optimizer state on every device of
the data axis and all-reduce the mean gradient; they differ in how the step is
written and compiled:

* ``pmap``: ``jax.pmap`` over the data-axis devices, ``lax.pmean`` of the
  gradients; params and state carry a leading device axis.
* ``shard_map``: ``jax.shard_map`` over the mesh with an explicit ``lax.pmean``.
* ``jit``: one global-view ``jax.jit`` with ``NamedSharding`` in and out
  shardings; GSPMD inserts the all-reduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._common import PyTree
from ._common import StepConfig
from ._common import Strategy
from ._common import apply_optimizer
from ._common import auto_mesh
from ._common import check_batch
from ._common import loss_scale
from ._common import mean_loss_and_grads
from ._common import put_batch_leaf
from ._common import put_params
from ._common import register_strategy
from ._common import split_local
from ._common import to_host


class _Replicated(Strategy):
  """Params and state replicated as global arrays with ``P()`` shardings;
  the batch split over the data axis with ``P(axis_name)``."""

  def sharding_mesh(self) -> Mesh:
    return self.config.mesh

  def context_mesh(self) -> Mesh:
    return self.sharding_mesh()

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.sharding_mesh(), P())

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.sharding_mesh(), P(self.config.axis_name))

  def init(self, params):
    replicated = self.replicated()
    params = jax.tree.map(lambda x: put_params(x, replicated), params)
    with jax.set_mesh(self.context_mesh()):
      # Made in place: the state is created directly in its layout.
      opt_state = jax.jit(
          self.config.optimizer.init, out_shardings=replicated)(params)
    return params, opt_state

  def place_batch(self, batch):
    check_batch(self.config, batch)
    sharding = self.batch_sharding()
    return jax.tree.map(lambda x: put_batch_leaf(x, sharding), batch)

  def gather(self, tree):
    return jax.tree.map(to_host, tree)

  def abstract_state(self, params):
    """``(params, opt_state)`` as ``init`` makes them (``ShapeDtypeStruct``)."""
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = jax.eval_shape(self.config.optimizer.init, bare)
    replicated = self.replicated()
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
    return jax.tree.map(place, bare), jax.tree.map(place, state)


class _OwnState(_Replicated):
  """Replicated params and an optimizer state of the strategy's own (local
  steps, 1-bit Adam): ``_initial(params)`` makes it, ``_state_shardings``
  places it; arrays with one row per device are split over the data axis."""

  def split(self) -> NamedSharding:
    """One row per data-axis device."""
    return NamedSharding(self.sharding_mesh(), P(self.config.axis_name))

  def per_device_copies(self, x) -> jax.Array:
    """``x`` repeated along a new leading axis, one row per device."""
    return jnp.broadcast_to(x, (self.config.num_shards,) + jnp.shape(x))

  def _initial(self, params):
    raise NotImplementedError

  def _state_shardings(self, state):
    raise NotImplementedError

  def init(self, params):
    replicated = self.replicated()
    params = jax.tree.map(lambda x: put_params(x, replicated), params)
    shardings = self._state_shardings(jax.eval_shape(self._initial, params))
    with jax.set_mesh(self.context_mesh()):
      state = jax.jit(self._initial, out_shardings=shardings)(params)
    return params, state

  def abstract_state(self, params):
    """``(params, opt_state)`` as ``init`` makes them (``ShapeDtypeStruct``)."""
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                        params)
    state = jax.eval_shape(self._initial, bare)
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    replicated = self.replicated()
    return (jax.tree.map(lambda x: place(x, replicated), bare),
            jax.tree.map(place, state, self._state_shardings(state)))


@register_strategy("shard_map")
class ShardMapStrategy(_Replicated):
  """``jax.shard_map`` over the mesh; each device computes the mean gradient
  of its share and a ``lax.pmean`` over the data axis averages them."""

  def build_step(self):
    config = self.config
    axis = config.axis_name
    split = split_local(config.accumulation_steps)

    def per_device(params, opt_state, batch):
      # With check_vma, the gradient with respect to a replicated (invariant)
      # input is already summed over the axis, and a pmean on top of it would
      # leave it num_shards times too large. Marking params as varying first
      # gives each device the gradient of its own share; pmean then averages.
      varying = jax.tree.map(
          lambda p: jax.lax.pcast(p, axis, to="varying"), params)
      loss, aux, grads = mean_loss_and_grads(config, varying, batch, split,
                                             loss_scale(opt_state))
      loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis)
      params, opt_state = apply_optimizer(
          config.optimizer, grads, opt_state, params)
      return params, opt_state, loss, aux

    step = jax.shard_map(
        per_device,
        mesh=config.mesh,
        in_specs=(P(), P(), P(axis)),
        out_specs=(P(), P(), P(), P()),
    )
    return jax.jit(step, donate_argnums=(0, 1))


@register_strategy("jit")
class JitStrategy(_Replicated):
  """One global-view ``jax.jit``: the gradient of the mean loss over the whole
  batch, with ``NamedSharding`` in and out shardings; GSPMD inserts the
  all-reduce.

  It runs on the mesh's devices and axis names with every axis ``Auto``, so
  GSPMD propagates shardings through any ``loss_fn``, whatever the axis types
  of the mesh passed in.
  """

  def __init__(self, config: StepConfig):
    super().__init__(config)
    self._mesh = auto_mesh(config.mesh)

  def sharding_mesh(self) -> Mesh:
    return self._mesh

  def build_step(self):
    config = self.config
    n, k = config.num_shards, config.accumulation_steps
    micro = NamedSharding(self._mesh, P(None, config.axis_name))

    def split(x):
      # Micro-batch j takes the j-th slice of every device's share, the same
      # cut as the per-device strategies, so no row leaves its device.
      m, rest = x.shape[0] // (n * k), x.shape[1:]
      x = x.reshape((n, k, m) + rest).swapaxes(0, 1).reshape((k, n * m) + rest)
      return jax.lax.with_sharding_constraint(x, micro)

    def step(params, opt_state, batch):
      loss, aux, grads = mean_loss_and_grads(config, params, batch, split,
                                             loss_scale(opt_state))
      params, opt_state = apply_optimizer(
          config.optimizer, grads, opt_state, params)
      return params, opt_state, loss, aux

    replicated = self.replicated()
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, self.batch_sharding()),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


@register_strategy("pmap")
class PmapStrategy(Strategy):
  """``jax.pmap`` over the data-axis devices with a ``lax.pmean`` of the
  gradients.

  Params and state live as arrays with a leading device axis, one replica per
  local device (``jax.pmap``'s own layout); a batch is reshaped to
  ``(local devices, share, ...)``. In a multi-process run every array is
  process-local, as ``jax.pmap`` expects, and the collectives span all
  processes.
  """

  def __init__(self, config: StepConfig):
    super().__init__(config)
    mesh, axis = config.mesh, config.axis_name
    others = {a: s for a, s in mesh.shape.items() if a != axis and s > 1}
    if others:
      raise ValueError(
          "`DataParallel(strategy='pmap')` maps over one axis: every mesh axis "
          f"other than axis_name={axis!r} must have size 1, got {others}; use "
          "strategy='shard_map' or 'jit' on a multi-axis mesh")
    self.devices = list(
        np.moveaxis(mesh.devices, mesh.axis_names.index(axis), 0).reshape(-1))
    me = jax.process_index()
    self.local_devices = [d for d in self.devices if d.process_index == me]
    self._local_mesh = Mesh(
        np.array(self.local_devices), (axis,), axis_types=(AxisType.Auto,))
    self._mesh = Mesh(
        np.array(self.devices), (axis,), axis_types=(AxisType.Auto,))

  def context_mesh(self) -> Mesh:
    return self._mesh

  def _pmap(self, fn, **kwargs):
    return jax.pmap(
        fn, axis_name=self.config.axis_name, devices=self.devices, **kwargs)

  def _stack(self, x) -> jax.Array:
    """One replica of ``x`` per local device, stacked on a new leading axis,
    without ever materialising the stack on one device."""
    x = jnp.asarray(x) if isinstance(x, jax.Array) else np.asarray(x)
    row = x[None]
    sharding = NamedSharding(self._local_mesh, P(self.config.axis_name))
    return jax.make_array_from_single_device_arrays(
        (len(self.local_devices),) + x.shape, sharding,
        [jax.device_put(row, d) for d in self.local_devices])

  def abstract_state(self, params):
    """``(params, opt_state)`` as ``init`` makes them: a leading axis of one
    replica per local device (``ShapeDtypeStruct``)."""
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = jax.eval_shape(self.config.optimizer.init, bare)
    n = len(self.local_devices)
    sharding = NamedSharding(self._local_mesh, P(self.config.axis_name))
    stack = lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype,
                                           sharding=sharding)
    return jax.tree.map(stack, bare), jax.tree.map(stack, state)

  def init(self, params):
    params = jax.tree.map(self._stack, params)
    with jax.set_mesh(self._mesh):
      opt_state = self._pmap(self.config.optimizer.init)(params)
    return params, opt_state

  def place_batch(self, batch):
    leaves = check_batch(self.config, batch)
    for path, x in leaves:
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError(
            "`DataParallel(strategy='pmap')` takes each process's own share of "
            "the batch (numpy or process-local arrays), got a global array at "
            f"{jax.tree_util.keystr(path)}")
    n_local = len(self.local_devices)
    sharding = NamedSharding(self._local_mesh, P(self.config.axis_name))

    def place(x):
      if not isinstance(x, jax.Array):
        x = np.asarray(x)
      x = x.reshape((n_local, x.shape[0] // n_local) + x.shape[1:])
      return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)

  def gather(self, tree: PyTree) -> PyTree:
    # Every replica is equal after a step: read the first local one.
    return jax.tree.map(
        lambda x: np.asarray(jax.device_get(x.addressable_data(0)))[0], tree)

  def build_step(self):
    config = self.config
    axis = config.axis_name
    split = split_local(config.accumulation_steps)

    def per_device(params, opt_state, batch):
      # Inside pmap the params are mapped (one replica per device), so the
      # gradient is this device's share alone and pmean averages it.
      loss, aux, grads = mean_loss_and_grads(config, params, batch, split,
                                             loss_scale(opt_state))
      loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis)
      params, opt_state = apply_optimizer(
          config.optimizer, grads, opt_state, params)
      return params, opt_state, loss, aux

    return self._pmap(
        per_device, donate_argnums=(0, 1), out_axes=(0, 0, None, None))
