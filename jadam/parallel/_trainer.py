"""``DataParallel``: a donated, compiled data-parallel training step in three
lines, over ``pmap``, ``shard_map`` or ``jit``, on one process or many."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from . import _checks
from . import _runtime
from . import _strategies  # noqa: F401  (registers the built-in strategies)
from ._common import PyTree
from ._common import StepConfig
from ._common import get_strategy
from .. import _flat
from .. import _validate as V
from .. import _loss_scale
from .._layout import FlatLayout
from .._packed import Packed


class DataParallel:
  """Data-parallel training step: the mean loss over a global batch split over
  the devices of one mesh axis, and one optimizer update from its gradient.

  Each of the ``N`` devices on ``mesh``'s ``axis_name`` axis computes the
  gradient of the mean loss over its ``B / N`` rows of the batch (optionally in
  ``accumulation_steps`` micro-batches); the gradients are averaged over the
  axis, which for equal shares is the gradient of the mean over all ``B`` rows,
  and every device applies the same ``optimizer`` update to its replica of
  the params and optimizer state.

  Strategies (``strategy=``), which give the same results:

  * ``"shard_map"`` (default): ``jax.shard_map`` over the mesh with an
    explicit ``lax.pmean``.
  * ``"jit"``: ``jax.jit`` with ``NamedSharding`` in/out shardings; GSPMD
    inserts the all-reduce.
  * ``"pmap"``: ``jax.pmap`` with ``lax.pmean``; params and state carry a
    leading device axis (one replica per local device).
  * ``"zero1"``, ``"zero2"`` (ZeRO; a jadam optimizer, bare or in the
    common optax chains, see ``jadam/parallel/_zero.py``): the optimizer
    state sharded flat over the data axis, ``1/N`` per device; the step
    reduce-scatters the gradient, updates each device's slice and
    all-gathers the params (``jadam/parallel/_zero.py``).
  * ``"fsdp"``: params, gradients and state all sharded over the data axis.

  And two that trade exactness for fewer bytes on the wire:

  * ``OneBit(warmup_steps=W)`` (``"onebit"``: ``W = 1000``; a jadam
    optimizer): 1-bit Adam, exact for ``W`` steps, then the momentum is
    exchanged as packed signs with error feedback and ``nu`` is frozen.
  * ``LocalSteps(inner_steps=H, outer_optimizer=...)`` (``"local"``:
    ``H = 8``): DiLoCo, ``H`` steps per replica, then one averaged outer step.

  Params and optimizer state passed to :meth:`step` are donated: use the
  returned ones. The step is compiled once per trainer and reused.

  Multi-process runs: call :func:`jadam.parallel.initialize` first (or
  ``jax.distributed.initialize``, which does not fail fast), build
  ``mesh`` over ``jax.devices()`` (all processes), pass every process the same
  initial params, and pass each process its own share of every global batch
  (numpy or process-local arrays; rows ``[i * B / P, (i + 1) * B / P)`` of the
  global batch in process ``i`` for ``jax.make_mesh``'s device order).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> import jadam.parallel
    >>> def loss_fn(params, batch):
    ...   x, y = batch
    ...   return jnp.mean((x @ params["w"] - y) ** 2)
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> trainer = jadam.parallel.DataParallel(loss_fn, optax.adam(1e-2), mesh)
    >>> params, opt_state = trainer.init({"w": np.zeros((3, 1), np.float32)})
    >>> x = np.ones((8 * jax.device_count(), 3), np.float32)
    >>> y = np.ones((8 * jax.device_count(), 1), np.float32)
    >>> params, opt_state, loss = trainer.step(params, opt_state, (x, y))
    >>> float(loss)
    1.0
    >>> trainer.gather(params)["w"].shape
    (3, 1)

  .. seealso:: :func:`jadam.parallel.available_strategies`,
    :func:`jadam.parallel.register_strategy`.
  """

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      optimizer: optax.GradientTransformation,
      mesh: Mesh,
      *,
      strategy: str = "shard_map",
      axis_name: str = "data",
      has_aux: bool = False,
      accumulation_steps: int = 1,
      layout: str = "tree",
      loss_scale=None,
      loss_scale_growth_interval: int = 2000,
  ):
    """Builds the trainer (nothing is compiled until the first step).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``, a float scalar, the mean
        loss over ``batch``; with ``has_aux=True`` it returns ``(loss, aux)``
        where ``aux`` is a pytree of float arrays that are likewise means over
        ``batch`` (accuracy, say), so that their average over devices and
        micro-batches is their mean over the global batch.
      optimizer: any ``optax.GradientTransformation`` (jadam's or optax's).
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis_name``; its
        axis types may be ``Explicit`` (``jax.make_mesh``'s default) or
        ``Auto``.
      strategy: one of :func:`available_strategies`: ``"shard_map"``,
        ``"jit"``, ``"pmap"``, ``"zero1"``, ``"zero2"``, ``"fsdp"``,
        ``"onebit"`` or ``"local"``; or a strategy object with options,
        ``jadam.parallel.OneBit(warmup_steps=W)`` or
        ``jadam.parallel.LocalSteps(inner_steps=H, outer_optimizer=...)``.
      axis_name: the mesh axis the batch is split over; params and state are
        replicated over every axis (ZeRO: the state is split over it, and
        params keep a ``NamedSharding`` over the other axes).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      accumulation_steps: number of equal micro-batches each device's share
        is split into inside one step (a ``lax.scan`` with one gradient
        accumulator); the result equals one step on the whole batch.
      layout: ``"tree"`` (params and state as given) or ``"flat"``: params are
        packed by :class:`jadam.FlatLayout` into one buffer per dtype and
        stay packed end to end — ``loss_fn`` still sees the tree (unpacked
        inside the step), the gradient comes out packed and the optimizer
        runs one fused pass per buffer. ``gather`` unpacks. The ZeRO
        strategies are flat already and take only ``"tree"``.
      loss_scale: for float16 compute: ``None`` (no scaling), a positive
        number (a fixed scale) or ``"dynamic"`` (from 2**15: halved when a
        step's gradient overflows, which is then skipped; doubled after
        ``loss_scale_growth_interval`` good steps; needs a jadam optimizer
        with ``skip_nonfinite=True``). The loss is multiplied by the scale
        before differentiation and the gradient unscaled in float32 inside
        the jadam optimizer's pass. The scale is in ``opt_state`` (a
        ``jadam.LossScaleState`` around the optimizer's state: checkpointed
        with it); :meth:`loss_scale` reads it.
      loss_scale_growth_interval: good steps after which a dynamic scale
        doubles.

    Raises:
      ValueError: for an unknown ``strategy``, a ``mesh`` without
        ``axis_name``, or ``accumulation_steps`` not a positive integer.
      TypeError: for a ``loss_fn`` that is not callable or an ``optimizer``
        that is not a ``GradientTransformation``.
    """
    if not callable(loss_fn):
      raise TypeError(
          f"`DataParallel(loss_fn=...)` must be callable, got {loss_fn!r}")
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
      raise TypeError(
          "`DataParallel(optimizer=...)` must be an optax "
          f"GradientTransformation (with init and update), got {optimizer!r}")
    if not isinstance(mesh, Mesh):
      raise ValueError(
          "`DataParallel(mesh=...)` must be a jax.sharding.Mesh with devices "
          f"(e.g. jax.make_mesh((n,), ({axis_name!r},))), got {mesh!r}")
    if axis_name not in mesh.axis_names:
      raise ValueError(
          f"`DataParallel(mesh=...)` must have the axis axis_name="
          f"{axis_name!r}; the mesh has axes {tuple(mesh.axis_names)}")
    if (isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int) or accumulation_steps < 1):
      raise ValueError(
          "`DataParallel(accumulation_steps=...)` must be a positive integer, "
          f"got {accumulation_steps!r}")
    _loss_scale.check_loss_scale("DataParallel", loss_scale, loss_scale_growth_interval)
    if loss_scale is not None:
      optimizer = _loss_scale.with_loss_scale(
          optimizer, loss_scale, growth_interval=loss_scale_growth_interval)
    options = None
    if not isinstance(strategy, str) and isinstance(getattr(strategy, "name", None), str):
      options, strategy = strategy, strategy.name  # a strategy object with options
    strategy_cls = get_strategy(strategy)
    if layout not in ("tree", "flat"):
      raise ValueError(
          f"`DataParallel(layout=...)` must be 'tree' or 'flat', got {layout!r}")
    if layout == "flat" and strategy.startswith("zero"):
      raise ValueError(
          f"`DataParallel(strategy={strategy!r})` keeps its state in the "
          "sharded flat layout already; use layout='tree' (the default)")
    self._layout = layout
    if layout == "flat":
      user_loss_fn = loss_fn

      def loss_fn(packed, batch):  # pylint: disable=function-redefined
        # The packed params carry their FlatLayout (static): a step traced
        # for one model never sees another's layout.
        return user_loss_fn(packed.layout.unpack(packed), batch)

    if jax.process_count() > 1 and strategy_cls.multiprocess_unsupported:
      raise ValueError(
          f"`DataParallel(strategy={strategy!r})` cannot run over several "
          f"processes: {strategy_cls.multiprocess_unsupported}")
    self._config = StepConfig(
        loss_fn=loss_fn,
        optimizer=optimizer,
        mesh=mesh,
        axis_name=axis_name,
        has_aux=V.check_bool("DataParallel", "has_aux", has_aux),
        accumulation_steps=accumulation_steps,
        options=options,
    )
    self._strategy_name = strategy
    self._strategy = strategy_cls(self._config)
    self._params_template: PyTree | None = None

  @property
  def strategy(self) -> str:
    """The strategy's name."""
    return self._strategy_name

  @property
  def mesh(self) -> Mesh:
    return self._config.mesh

  @property
  def axis_name(self) -> str:
    return self._config.axis_name

  @property
  def num_devices(self) -> int:
    """Devices on the data axis (over all processes): the batch's divisor."""
    return self._config.num_shards

  @property
  def accumulation_steps(self) -> int:
    return self._config.accumulation_steps

  @property
  def layout(self) -> str:
    """``"tree"`` or ``"flat"`` (params packed end to end)."""
    return self._layout

  def init(self, params: PyTree) -> tuple[PyTree, PyTree]:
    """Places ``params`` and creates the optimizer state in the strategy's
    layout.

    Args:
      params: a pytree of arrays (numpy or jax), the same value in every
        process. It is not donated.

    Returns:
      ``(params, opt_state)`` ready for :meth:`step`. With ``layout="flat"``
      the params are a :class:`jadam.Packed` value that carries its
      :class:`jadam.FlatLayout` (``params.layout``).
    """
    _checks.params(params)
    if self._layout == "flat":
      params = self._flat_layout(params).pack(params)
    self._params_template = _shape_dtypes(params)
    return self._strategy.init(params)

  def _flat_layout(self, params) -> FlatLayout:
    # Quantized moments: small leaves in a float32-moment buffer of their own.
    small_leaf = _flat.optimizer_packing(self._config.optimizer)[2]
    return FlatLayout.from_tree(params, small_leaf=small_leaf)

  @property
  def params_template(self) -> PyTree | None:
    """Shapes, dtypes (and shardings) of the params last passed to
    :meth:`init`, as ``jax.ShapeDtypeStruct`` leaves; ``None`` before."""
    return self._params_template

  def abstract_state(self, params: PyTree | None = None) -> tuple[PyTree, PyTree]:
    """``(params, opt_state)`` as :meth:`init` would lay them out, as
    ``jax.ShapeDtypeStruct`` leaves with shardings; nothing is allocated.

    Restoring a checkpoint into this trainer's mesh and layout reads these
    (see :class:`jadam.checkpoint.Checkpointer`).

    Args:
      params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (a param's
        ``NamedSharding`` counts where the strategy keeps it); default: the
        params last passed to :meth:`init`.

    Raises:
      ValueError: when ``params`` is not given and :meth:`init` was never
        called.
    """
    if params is None:
      params = self._params_template
      if params is None:
        raise ValueError(
            "`DataParallel.abstract_state()` needs `params` (arrays or "
            "jax.ShapeDtypeStruct) until `init` has been called")
    if self._layout == "flat" and not isinstance(params, Packed):
      params = self._flat_layout(params).shape_dtypes()  # as init packs them
    return _abstract_state(self._strategy, _shape_dtypes(params))

  def step(self, params: PyTree, opt_state: PyTree, batch: PyTree):
    """One data-parallel step over a global batch.

    Args:
      params: params from :meth:`init` or a previous step (donated).
      opt_state: optimizer state from :meth:`init` or a previous step
        (donated).
      batch: a pytree of arrays whose leading dimension is the batch: the
        global batch in a single-process run, this process's share of it in
        a multi-process run (or global ``jax.Array``s). Its size must divide
        by ``num_devices * accumulation_steps``.

    Returns:
      ``(params, opt_state, loss)``, or ``(params, opt_state, (loss, aux))``
      with ``has_aux=True``: ``loss`` and ``aux`` are the means over the
      global batch, replicated jax arrays (``float(loss)`` to read it).

    Raises:
      ValueError: when the batch leaves have no common leading size or it
        does not divide over the devices and micro-batches.
    """
    try:
      params, opt_state, loss, aux = self._strategy.step(
          params, opt_state, batch)
    except (ValueError, TypeError) as e:
      # An error from deep inside JAX: say which argument does not fit (the
      # step's own checks already name theirs).
      if "DataParallel.step" in str(e):
        raise
      problem = self._layout_mismatch(params, opt_state)
      if problem is None:
        raise
      raise ValueError(f"`DataParallel.step`: {problem}. Pass the params and "
                       "opt_state that `init` (or the last `step`, or "
                       "`Checkpointer.restore`) returned") from e
    except _runtime.RUNTIME_ERRORS as e:
      _runtime.explain(e)  # a lost process of a fail-fast run: name it
      raise
    if self._config.has_aux:
      return params, opt_state, (loss, aux)
    return params, opt_state, loss

  def _layout_mismatch(self, params, opt_state) -> str | None:
    """How params / opt_state differ from this trainer's layout (after a step
    failed), or ``None``."""
    if self._params_template is None:
      return None
    try:
      want_params, want_state = self.abstract_state()
    except Exception:  # pylint: disable=broad-except
      return None
    return (_checks.mismatch("params", params, want_params)
            or _checks.mismatch("opt_state", opt_state, want_state))

  def lower(self, params: PyTree, opt_state: PyTree,
            batch: PyTree) -> jax.stages.Lowered:
    """The step lowered for these arguments (nothing is donated or run).

    ``trainer.lower(...).compile().as_text()`` is the optimized HLO, where the
    collectives the strategy uses can be read.

    Returns:
      The ``jax.stages.Lowered`` step.
    """
    return self._strategy.lower(params, opt_state, batch)

  def loss_scale(self, opt_state: PyTree) -> float | None:
    """The loss scale the next :meth:`step` with ``opt_state`` uses (a
    float), or ``None`` without ``loss_scale``. (Local steps: each replica
    keeps its own; this is the first replica's.)"""
    scale = _loss_scale.scale_of(opt_state)
    if scale is None:
      return None
    return float(self._strategy.gather(scale).reshape(-1)[0])

  def gather(self, tree: PyTree) -> PyTree:
    """Host numpy copies of params or optimizer state in this layout.

    Args:
      tree: params or optimizer state from :meth:`init` or :meth:`step`.

    Returns:
      The same tree of ``np.ndarray`` with the shapes of a single-device run
      (no device axis); in a multi-process run, the full value in every
      process. With ``layout="flat"``, packed params (and packed moments)
      come back unpacked, as trees shaped like the params.
    """
    out = self._strategy.gather(tree)

    def is_packed(x):
      return isinstance(x, Packed) and isinstance(x.layout, FlatLayout)

    # Packed values unpack with the layout they carry, whatever init saw last.
    return jax.tree.map(
        lambda x: jax.tree.map(np.asarray, x.layout.unpack(x)) if is_packed(x) else x,
        out, is_leaf=is_packed)

  def __repr__(self) -> str:
    return (f"DataParallel(strategy={self.strategy!r}, "
            f"axis_name={self.axis_name!r}, num_devices={self.num_devices}, "
            f"accumulation_steps={self.accumulation_steps}, "
            f"has_aux={self._config.has_aux}, layout={self._layout!r})")


def _shape_dtypes(params: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves (with a leaf's ``NamedSharding``)."""

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    dtype = getattr(x, "dtype", None)
    return jax.ShapeDtypeStruct(
        np.shape(x), dtype if dtype is not None else np.asarray(x).dtype,
        sharding=sharding if isinstance(sharding, NamedSharding) else None)

  return jax.tree.map(leaf, params)


def _abstract_state(strategy, params: PyTree) -> tuple[PyTree, PyTree]:
  """The strategy's ``abstract_state`` (every built-in strategy has one)."""
  own = getattr(strategy, "abstract_state", None)
  if own is None:
    raise NotImplementedError(
        f"strategy {type(strategy).__name__} does not describe its layout: give "
        "it an `abstract_state(params) -> (params, opt_state)` method returning "
        "jax.ShapeDtypeStruct leaves with shardings")
  return own(params)
