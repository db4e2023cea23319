"""Pieces every data-parallel strategy shares: the step's configuration, the
gradient of the mean loss with micro-batching, batch checks, placement and
gathering.

A strategy (see ``_strategies.py``) decides only the layout of the state and how
gradients meet across devices; the math of one step lives here, once.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding

# The loss scale held in an optimizer state (DataParallel(loss_scale=...)), or None.
from .._loss_scale import scale_of as loss_scale  # noqa: F401  (used by the strategies)
from . import _checks

PyTree = Any
# Cuts a batch leaf into micro-batches: (b, ...) -> (k, b // k, ...).
SplitFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything a strategy needs to build a data-parallel step.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` when
      ``has_aux``), the mean loss over ``batch``.
    optimizer: any ``optax.GradientTransformation``.
    mesh: the device mesh; ``axis_name`` is its data-parallel axis.
    axis_name: the mesh axis the batch is split over.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    accumulation_steps: number of micro-batches each device's share is split
      into inside one step.
    options: the strategy object passed as ``strategy=`` (e.g.
      ``LocalSteps(inner_steps=8)``), or ``None`` for a strategy named by a
      string.
  """

  loss_fn: Callable[..., Any]
  optimizer: optax.GradientTransformation
  mesh: Mesh
  axis_name: str
  has_aux: bool
  accumulation_steps: int
  options: Any = None

  @property
  def num_shards(self) -> int:
    """Number of devices along the data axis, over all processes."""
    return self.mesh.shape[self.axis_name]

  @functools.cached_property
  def num_local_shards(self) -> int:
    """Number of data-axis positions that hold a device of this process."""
    axis = self.mesh.axis_names.index(self.axis_name)
    rows = np.moveaxis(self.mesh.devices, axis, 0).reshape(self.num_shards, -1)
    me = jax.process_index()
    return sum(any(d.process_index == me for d in row) for row in rows)


def auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis ``Auto`` (GSPMD propagates the shardings)."""
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


class Strategy(abc.ABC):
  """How one data-parallel step is laid out and compiled.

  A strategy owns the layout of params and optimizer state on the devices
  (``init``, ``gather``), the layout of a batch (``place_batch``) and the
  compiled step (``build_step``). ``DataParallel`` calls these and nothing else,
  so a new strategy is one subclass registered with :func:`register_strategy`.
  """

  #: Why the strategy cannot run over several processes, or ``None`` if it can.
  multiprocess_unsupported: ClassVar[str | None] = None

  def __init__(self, config: StepConfig):
    self.config = config
    self._step_fn: Callable[..., Any] | None = None

  @abc.abstractmethod
  def init(self, params: PyTree) -> tuple[PyTree, PyTree]:
    """Places ``params`` and creates the optimizer state in this layout."""

  @abc.abstractmethod
  def place_batch(self, batch: PyTree) -> PyTree:
    """Turns a (process-local) host or device batch into the step's input."""

  @abc.abstractmethod
  def gather(self, tree: PyTree) -> PyTree:
    """Host numpy copy of a tree in this layout, as if on one device."""

  @abc.abstractmethod
  def build_step(self) -> Callable[..., Any]:
    """The compiled ``(params, opt_state, batch) -> (params, opt_state, loss,
    aux)``; it must have ``.lower`` and donate params and state."""

  @abc.abstractmethod
  def context_mesh(self) -> Mesh:
    """The mesh set as JAX's context mesh while the step traces and runs."""

  @property
  def step_fn(self) -> Callable[..., Any]:
    """The step, built once and then reused (jax caches its compilation)."""
    if self._step_fn is None:
      self._step_fn = self.build_step()
    return self._step_fn

  def step(self, params, opt_state, batch):
    _checks.live(params, opt_state)  # a donated array would crash the process
    batch = self.place_batch(batch)
    # The step runs under the strategy's own mesh, so a caller's context mesh
    # (say an Explicit one set with `jax.set_mesh`) cannot clash with it.
    with jax.set_mesh(self.context_mesh()):
      out = self.step_fn(params, opt_state, batch)
    if self._blocks_each_step:
      # XLA:CPU runs a collective's participants on a shared thread pool; with
      # more (fake) devices than cores, several steps dispatched ahead can
      # starve a rendezvous ("Expected 8 threads ... only 6 arrived") and hang.
      # On CPU the step is synchronous anyway, so wait for it.
      jax.block_until_ready(out)
    return out

  @functools.cached_property
  def _blocks_each_step(self) -> bool:
    devices = self.config.mesh.devices.flat
    return self.config.mesh.size > 1 and all(d.platform == "cpu" for d in devices)

  def lower(self, params, opt_state, batch) -> jax.stages.Lowered:
    batch = self.place_batch(batch)
    with jax.set_mesh(self.context_mesh()):
      return self.step_fn.lower(params, opt_state, batch)


_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
  """Class decorator that makes a :class:`Strategy` available by ``name``.

  Args:
    name: the value of ``DataParallel(strategy=...)`` that selects it.

  Returns:
    The decorator, which returns the class unchanged.
  """

  def register(cls: type[Strategy]) -> type[Strategy]:
    if name in _STRATEGIES:
      raise ValueError(f"strategy {name!r} is already registered")
    _STRATEGIES[name] = cls
    return cls

  return register


def available_strategies() -> tuple[str, ...]:
  """Names accepted by ``DataParallel(strategy=...)``."""
  return tuple(_STRATEGIES)


def get_strategy(name: str) -> type[Strategy]:
  try:
    return _STRATEGIES[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"`DataParallel(strategy=...)` must be one of "
        f"{available_strategies()}, got {name!r}") from None


# ---------------------------------------------------------------------------
# The math of one step.


def _accumulator_dtype(dtype) -> jnp.dtype:
  # Sum micro-batch gradients in at least float32, so k bfloat16 gradients do
  # not lose their low bits to the running sum.
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(dtype)


def mean_loss_and_grads(
    config: StepConfig,
    params: PyTree,
    batch: PyTree,
    split: SplitFn,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, PyTree, PyTree]:
  """Loss, aux and gradient, each the mean over ``batch``.

  With ``accumulation_steps == 1`` this is one ``jax.value_and_grad``. With
  ``k > 1`` every leaf of ``batch`` is cut by ``split`` into ``k`` equal
  micro-batches, a ``lax.scan`` walks them with one gradient accumulator, and
  loss, aux and gradient are averaged over the ``k`` micro-batches, which is
  their mean over ``batch`` because the micro-batches are equal in size.

  Args:
    config: the step's configuration.
    params: the parameters to differentiate with respect to.
    batch: this call's batch (one device's share, or the global batch).
    split: maps a batch leaf to ``(k, leaf.shape[0] // k, ...)``.
    scale: the loss scale (``loss_scale(opt_state)``), or ``None``: the loss is
      multiplied by it before differentiation and the gradient stays scaled
      (the optimizer unscales it); the loss returned is unscaled.

  Returns:
    ``(loss, aux, grads)``; ``aux`` is ``None`` unless ``config.has_aux``.
  """
  def loss_and_aux(p, b):
    loss, aux = _checks.loss_output(config.loss_fn(p, b), config.has_aux)
    return (loss if scale is None else loss * scale), aux

  value_and_grad = jax.value_and_grad(loss_and_aux, has_aux=True)
  unscale = (lambda loss: loss) if scale is None else (lambda loss: loss / scale)
  k = config.accumulation_steps
  if k == 1:
    (loss, aux), grads = value_and_grad(params, batch)
    return unscale(loss), aux, grads

  def accumulate(acc, micro_batch):
    (loss, aux), grads = value_and_grad(params, micro_batch)
    acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
    return acc, (loss, aux)

  # zeros_like keeps the varying-ness of params inside shard_map, so the
  # carry's type does not change after the first micro-batch.
  acc = jax.tree.map(
      lambda p: jnp.zeros_like(p, dtype=_accumulator_dtype(p.dtype)), params)
  acc, (losses, auxes) = jax.lax.scan(
      accumulate, acc, jax.tree.map(split, batch))
  grads = jax.tree.map(lambda a, p: (a / k).astype(p.dtype), acc, params)
  loss = jnp.mean(losses, axis=0)
  aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxes)
  return unscale(loss), aux, grads


def apply_optimizer(
    optimizer: optax.GradientTransformation,
    grads: PyTree,
    opt_state: PyTree,
    params: PyTree,
) -> tuple[PyTree, PyTree]:
  """One optimizer update, applied: ``(params, opt_state)`` after the step."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def split_local(k: int) -> SplitFn:
  """Cuts one device's share ``(b, ...)`` into ``(k, b // k, ...)``."""
  return lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])


# ---------------------------------------------------------------------------
# Batches: checks and placement.


def _is_global(x) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def check_batch(config: StepConfig, batch: PyTree) -> list:
  """Checks a batch's leaves and returns them with their paths.

  Every leaf needs a leading batch dimension, the same for all leaves, that
  splits evenly over the data-axis devices and then into the micro-batches.
  In a multi-process run a numpy (or process-local) leaf is this process's
  share; a global ``jax.Array`` is the whole batch.

  Raises:
    ValueError: with what was expected and what was found.
  """
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("`batch` must contain at least one array, got an empty "
                     f"tree: {batch!r}")
  n, k = config.num_shards, config.accumulation_steps
  n_local = config.num_local_shards
  def where(path):
    return jax.tree_util.keystr(path) or "<root>"

  sizes = []  # the global batch size each leaf stands for
  for path, x in leaves:
    shape = np.shape(x)
    if not shape:
      raise ValueError(
          "every `batch` leaf needs a leading batch dimension; the leaf at "
          f"{where(path)} is a scalar")
    sizes.append(shape[0] if _is_global(x) or n_local == n
                 else shape[0] * n // n_local)
  if len(set(sizes)) > 1:
    raise ValueError(
        "all `batch` leaves must have the same leading (batch) size; got "
        + ", ".join(f"{where(p)}: {s}" for (p, _), s in zip(leaves, sizes)))
  size = sizes[0]
  if size == 0:
    raise ValueError(
        "the global batch is empty (0 rows): every `batch` leaf needs at least "
        f"{n * k} rows (one per device{' and micro-batch' if k > 1 else ''})")
  if size % (n * k):
    share = "" if n_local == n else (
        f" (this process's share is {size * n_local // n} rows for its "
        f"{n_local} devices)")
    need = f"{n} devices on mesh axis {config.axis_name!r}"
    if k > 1:
      need += f" x accumulation_steps={k} = {n * k}"
    raise ValueError(
        f"the global batch size must be divisible by the {need}; got a "
        f"batch of {size}{share}")
  return leaves


def put_params(x, sharding: NamedSharding) -> jax.Array:
  """``x`` (the same full value in every process) placed with ``sharding``, in
  buffers of its own: the step donates what ``init`` returns, and the
  caller's array must survive that (``device_put`` may reuse its buffer)."""
  if isinstance(x, jax.Array):
    if not sharding.is_fully_addressable and x.is_fully_addressable:
      x = np.asarray(x)  # a process-local array cannot be put on other hosts
    else:
      x = jnp.copy(x)
  return jax.device_put(x, sharding)


def put_batch_leaf(x, sharding: NamedSharding) -> jax.Array:
  """A batch leaf, process-local share or global array, as a global array."""
  if isinstance(x, jax.Array) and (
      not x.is_fully_addressable or sharding.is_fully_addressable):
    return jax.device_put(x, sharding)  # a no-op when already placed so
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def to_host(x) -> np.ndarray:
  """A host numpy copy of ``x``, the full value in every process."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_replicated:
    # One copy is enough, and it is addressable in every process.
    return np.asarray(jax.device_get(x.addressable_data(0)))
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
