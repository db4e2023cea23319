"""The benchmark's cases and runners: each implementation as a ``Runner`` whose
``step()`` runs one complete step (see :mod:`jadam.bench._bench` for the method)."""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam
from jadam import FlatLayout

LEARNING_RATE = 1e-3

# ------------------------------------------------------------------- cases


class Case(NamedTuple):
  name: str  # "a" ... "e"
  title: str
  kind: str  # "optimizer": one optimizer step on given grads; "train": forward+backward+update
  shapes: list[tuple[int, ...]] | None  # param leaf shapes (optimizer cases)
  model: dict | None  # TransformerLM config and batch (train case)


def _transformer_shapes(vocab, d, layers, ff, ctx) -> list[tuple[int, ...]]:
  """Leaf shapes of a GPT-like model: embeddings, attention and MLP matrices,
  biases and norms (16 leaves per layer)."""
  shapes = [(vocab, d), (ctx, d)]
  for _ in range(layers):
    shapes += [(d,), (d,)]  # norm scale, bias
    shapes += [(d, d), (d,)] * 4  # q, k, v, out projections
    shapes += [(d,), (d,)]  # norm scale, bias
    shapes += [(d, ff), (ff,), (ff, d), (d,)]  # MLP
  shapes += [(d,), (d,)]  # final norm
  return shapes


def make_cases(quick: bool, device: str) -> dict[str, Case]:
  """The five cases at full (or ``quick``) size; case (d) is ~1B params on GPU."""
  if quick:  # a smoke test of every code path: seconds, dominated by compiling
    a = [(1 << 16,)]
    b = _transformer_shapes(256, 32, 1, 128, 64)
    c = [(100,)] * 64
    d = _transformer_shapes(512, 256, 1, 512, 64)
    e = dict(vocab=64, d_model=16, num_layers=1, num_heads=2, d_ff=64, seq_len=16, batch=2)
  else:
    a = [(1 << 24,)]
    b = _transformer_shapes(4096, 320, 12, 1280, 512)
    c = [(1000,)] * 2000
    if device == "gpu":
      d = _transformer_shapes(8192, 2048, 20, 8192, 2048)
    else:
      d = _transformer_shapes(2048, 768, 14, 3072, 512)
    e = dict(vocab=2048, d_model=256, num_layers=4, num_heads=4, d_ff=1024, seq_len=64, batch=8)
  return {
      "a": Case("a", "one leaf", "optimizer", a, None),
      "b": Case("b", "transformer-like tree", "optimizer", b, None),
      "c": Case("c", "many small leaves", "optimizer", c, None),
      "d": Case("d", "large model", "optimizer", d, None),
      "e": Case("e", "Flax transformer train step", "train", None, e),
  }


CASES = ("a", "b", "c", "d", "e")


# ------------------------------------------------------------------ runners


class Runner:
  """One implementation on one case: ``step()`` runs one complete step;
  ``steps_run`` counts them and ``params()`` reads the params they reached."""

  compile_s: float | None = None
  peak_bytes: int | None = None
  peak_source: str | None = None
  xla_bytes_accessed: float | None = None
  steps_run: int = 0

  def step(self) -> None:
    self._step()
    self.steps_run += 1

  def _step(self) -> None:
    raise NotImplementedError

  def params(self) -> list:
    """The current params as leaves in the tree's flattening order."""
    raise NotImplementedError

  def array_bytes(self) -> tuple[int, int, int]:
    """``(params, optimizer state, other inputs)``: the bytes of the arrays
    the step is given (summed ``nbytes`` of their leaves; a quantized
    moment's are its uint8 codes and float32 scales). The other inputs are
    the gradients (the tokens in the train case)."""
    raise NotImplementedError

  def close(self) -> None:
    pass


def _nbytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _bytes_from_cost_analysis(compiled) -> float | None:
  """XLA's ``bytes accessed`` of the compiled step: the operand and output
  bytes of every top-level instruction (each fusion counted once), summed."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = None if not cost else cost.get("bytes accessed")
  return None if value is None else float(value)


def _peak_from_memory_analysis(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.temp_size_in_bytes)


class JaxRunner(Runner):
  """A donated, ahead-of-time compiled step ``fn(carry0, carry1, *rest) -> (carry0, carry1, ...)``.

  ``carry0`` is the params; ``unpack`` maps it to a tree of params (for a
  packed carry).
  """

  def __init__(self, fn: Callable, args: tuple, n_carry: int = 2,
               unpack: Callable | None = None):
    t0 = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=tuple(range(n_carry)))
    self._compiled = jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - t0
    self.peak_bytes = _peak_from_memory_analysis(self._compiled)
    self.peak_source = "xla memory_analysis"
    self.xla_bytes_accessed = _bytes_from_cost_analysis(self._compiled)
    # Donation keeps every carry's shapes and dtypes: these sizes hold at every step.
    self._array_bytes = (_nbytes(args[0]), _nbytes(args[1:n_carry]), _nbytes(args[n_carry:]))
    self._args = list(args)
    self._n_carry = n_carry
    self._unpack = unpack

  def _step(self) -> None:
    out = self._compiled(*self._args)
    jax.block_until_ready(out)
    self._args[:self._n_carry] = out[:self._n_carry]

  def params(self) -> list:
    p = self._args[0]
    return jax.tree.leaves(p if self._unpack is None else self._unpack(p))

  def array_bytes(self) -> tuple[int, int, int]:
    return self._array_bytes

  def close(self) -> None:
    self._args = None
    self._compiled = None


class TorchRunner(Runner):
  """``torch.optim.Adam(fused=True)`` or ``(foreach=True)`` on fixed gradients."""

  def __init__(self, params: list[np.ndarray], grads: list[np.ndarray], mode: str, device: str):
    import torch  # pylint: disable=import-outside-toplevel

    self._torch = torch
    self._cuda = device == "gpu"
    dev = "cuda" if self._cuda else "cpu"
    self._params = []
    for p, g in zip(params, grads):
      t = torch.from_numpy(np.array(p)).to(dev).requires_grad_(True)
      t.grad = torch.from_numpy(np.array(g)).to(dev)
      self._params.append(t)
    self._opt = torch.optim.Adam(
        self._params, lr=LEARNING_RATE, fused=(mode == "fused"), foreach=(mode == "foreach")
    )
    if self._cuda:
      torch.cuda.reset_peak_memory_stats()
      self.peak_source = "torch.cuda.max_memory_allocated"

  def _step(self) -> None:
    self._opt.step()
    if self._cuda:
      self._torch.cuda.synchronize()

  def params(self) -> list:
    return [p.detach().cpu().numpy() for p in self._params]

  def array_bytes(self) -> tuple[int, int, int]:
    # torch creates its state (exp_avg, exp_avg_sq, step) at the first step.
    def size(t):
      return t.element_size() * t.nelement()
    state = sum(size(t) for st in self._opt.state.values() for t in st.values()
                if self._torch.is_tensor(t))
    return (sum(size(p) for p in self._params), state,
            sum(size(p.grad) for p in self._params))

  def peak(self) -> int | None:
    return int(self._torch.cuda.max_memory_allocated()) if self._cuda else None

  def close(self) -> None:
    self._opt = None
    self._params = None


def torch_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _optimizer_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _flat_step(kernel: str = "auto"):
  def step(packed, state, grads):
    return jadam.step(grads, state, packed, learning_rate=LEARNING_RATE, kernel=kernel)
  return step


QUANTIZED = "q8"
"""The moment format of the ``*_q8`` rows (``mu_dtype`` and ``nu_dtype``)."""


def quantized_adam(layout: str = "tree", kernel: str = "auto"):
  """``jadam.adam`` with both moments 8-bit block-wise (leaves under 4096
  elements keep float32 moments)."""
  return jadam.adam(LEARNING_RATE, mu_dtype=QUANTIZED, nu_dtype=QUANTIZED, layout=layout,
                    kernel=kernel)


def quantized_flat_layout(params) -> FlatLayout:
  """The layout ``jadam.adam(..., layout="flat")`` with q8 moments packs
  ``params`` in (read from its abstract state, nothing allocated): every leaf
  with quantized moments in a buffer of its own, quantized in the tree
  layout's blocks; the small leaves share float32-moment buffers."""
  state = jax.eval_shape(quantized_adam("flat").init, params)
  return state[0].mu.layout


def _random_tree(shapes, seed: int, scale: float, device):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
      f"p{i:04d}": jax.device_put(scale * jax.random.normal(k, s, jnp.float32), device)
      for i, (k, s) in enumerate(zip(keys, shapes))
  }


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def build_optimizer_runners(case: Case, impls, device, jax_device) -> tuple[dict, int, int]:
  """Runners for an optimizer-only case; returns (runners, n_params, n_leaves)."""
  params = _random_tree(case.shapes, 0, 0.02, jax_device)
  grads = _random_tree(case.shapes, 1, 1e-3, jax_device)
  runners = {}
  for impl in impls:
    if impl == "optax":
      tx = optax.adam(LEARNING_RATE)
      p = _copy(params)
      runners[impl] = JaxRunner(_optimizer_step(tx), (p, tx.init(p), grads))
    elif impl == "jadam_tree":
      tx = jadam.adam(LEARNING_RATE)
      p = _copy(params)
      runners[impl] = JaxRunner(_optimizer_step(tx), (p, tx.init(p), grads))
    elif impl in ("jadam_flat_tree_io", "jadam_flat_tree_io_xla"):
      tx = jadam.adam(LEARNING_RATE, layout="flat",
                      kernel="xla" if impl.endswith("_xla") else "auto")
      p = _copy(params)
      runners[impl] = JaxRunner(_optimizer_step(tx), (p, tx.init(p), grads))
    elif impl == "jadam_tree_fused":
      tx = jadam.adam(LEARNING_RATE, kernel="fused")
      p = _copy(params)
      runners[impl] = JaxRunner(_optimizer_step(tx), (p, tx.init(p), grads))
    elif impl == "jadam_step_fused":
      p = _copy(params)
      runners[impl] = JaxRunner(_flat_step("fused"), (p, jadam.init(p), grads))
    elif impl in ("jadam_flat", "jadam_flat_fused"):
      layout = FlatLayout.from_tree(params)
      packed = jax.jit(layout.pack)(params)
      runners[impl] = JaxRunner(
          _flat_step("fused" if impl.endswith("_fused") else "xla"),
          (packed, jadam.init(packed), jax.jit(layout.pack)(grads)), unpack=layout.unpack,
      )
    elif impl in ("jadam_tree_q8", "jadam_tree_q8_xla"):
      tx = quantized_adam(kernel="xla" if impl.endswith("_xla") else "auto")
      p = _copy(params)
      runners[impl] = JaxRunner(_optimizer_step(tx), (p, tx.init(p), grads))
    elif impl in ("jadam_flat_q8", "jadam_flat_q8_fused"):
      # Flat end to end like jadam_flat (jadam.step), in the buffers of the
      # q8 flat layout (a buffer per quantized leaf).
      layout = quantized_flat_layout(params)
      packed = jax.jit(layout.pack)(params)
      state = jadam.init(packed, mu_dtype=QUANTIZED, nu_dtype=QUANTIZED)
      runners[impl] = JaxRunner(
          _flat_step("fused" if impl.endswith("_fused") else "xla"),
          (packed, state, jax.jit(layout.pack)(grads)), unpack=layout.unpack)
    elif impl == "optax_sgd":
      tx = optax.sgd(LEARNING_RATE)
      p = _copy(params)
      runners[impl] = JaxRunner(_optimizer_step(tx), (p, tx.init(p), grads))
    elif impl in ("torch_fused", "torch_foreach"):
      leaves_p = [np.asarray(x) for x in jax.tree.leaves(params)]
      leaves_g = [np.asarray(x) for x in jax.tree.leaves(grads)]
      runners[impl] = TorchRunner(leaves_p, leaves_g, impl.split("_")[1], device)
    else:
      raise ValueError(f"unknown implementation {impl!r}")
  n_params = sum(math.prod(s) for s in case.shapes)
  return runners, n_params, len(case.shapes)


def build_train_runners(case: Case, impls, jax_device) -> tuple[dict, int, int]:
  """Runners for the full Flax training step (forward, backward, update)."""
  from . import _model  # pylint: disable=import-outside-toplevel  (needs flax)

  cfg = dict(case.model)
  batch = cfg.pop("batch")
  model = _model.TransformerLM(**cfg)
  tokens = jax.device_put(
      jax.random.randint(jax.random.key(2), (batch, cfg["seq_len"]), 0, cfg["vocab"]), jax_device
  )
  params = jax.device_put(model.init(jax.random.key(0), tokens), jax_device)

  def loss(p, toks):
    return _model.next_token_loss(model, p, toks)

  def tree_step(tx):
    def step(p, state, toks):
      value, grads = jax.value_and_grad(loss)(p, toks)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state, value
    return step

  runners = {}
  for impl in impls:
    if impl in ("optax", "jadam_tree", "jadam_flat_tree_io", "jadam_flat_tree_io_xla",
                "jadam_tree_q8"):
      tx = {
          "optax": lambda: optax.adam(LEARNING_RATE),
          "jadam_tree": lambda: jadam.adam(LEARNING_RATE),
          "jadam_flat_tree_io": lambda: jadam.adam(LEARNING_RATE, layout="flat"),
          "jadam_flat_tree_io_xla": lambda: jadam.adam(LEARNING_RATE, layout="flat",
                                                       kernel="xla"),
          "jadam_tree_q8": quantized_adam,
      }[impl]()
      p = _copy(params)
      runners[impl] = JaxRunner(tree_step(tx), (p, tx.init(p), tokens))
    elif impl == "jadam_flat_q8":
      layout = quantized_flat_layout(params)
      tx = quantized_adam()

      def flat_q8_step(packed, state, toks, layout=layout, tx=tx):
        value, grads = jax.value_and_grad(lambda q: loss(layout.unpack(q), toks))(packed)
        updates, state = tx.update(grads, state, packed)
        return optax.apply_updates(packed, updates), state, value

      packed = jax.jit(layout.pack)(params)
      runners[impl] = JaxRunner(flat_q8_step, (packed, tx.init(packed), tokens),
                                unpack=layout.unpack)
    elif impl == "jadam_flat":
      layout = FlatLayout.from_tree(params)

      def flat_step(packed, state, toks, layout=layout):
        value, grads = jax.value_and_grad(lambda q: loss(layout.unpack(q), toks))(packed)
        packed, state = jadam.step(grads, state, packed, learning_rate=LEARNING_RATE)
        return packed, state, value

      packed = jax.jit(layout.pack)(params)
      runners[impl] = JaxRunner(flat_step, (packed, jadam.init(packed), tokens),
                                unpack=layout.unpack)
    # torch has no Flax model: the train case is JAX only.
  leaves = jax.tree.leaves(params)
  return runners, sum(x.size for x in leaves), len(leaves)


def _copy_runner(n_elements: int, jax_device) -> JaxRunner:
  x = jax.device_put(jnp.ones((n_elements,), jnp.float32), jax_device)
  return JaxRunner(lambda x, y: (-x, y), (x, jnp.zeros((), jnp.float32)))
