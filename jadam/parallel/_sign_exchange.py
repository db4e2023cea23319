"""1-bit Adam's exchange (Tang et al. 2021): the mean of every device's
momentum, sent as signs packed 8 per byte and one float32 scale per chunk,
with error feedback on the sending (worker) and the reducing (server) side.

The flat momentum (all leaves raveled, float32, zero-padded to ``P`` elements,
a multiple of ``8 N``) is cut into ``N`` chunks of ``C = P / N``; device
``j`` is the server of chunk ``j``. One step, on every device ``i``:

1. worker: ``c = m_i + e_i``; each chunk ``k`` of ``c`` is compressed to
   ``s_k sign(c_k)`` with ``s_k = |c_k|_2 / sqrt(n_k)`` (``n_k`` its elements
   that are not padding; the sign of 0 is +); ``e_i = c - compressed``;
2. one all-to-all sends chunk ``k``'s packed signs and scale to device ``k``;
3. server: the mean of the ``N`` decompressed chunks it received, ``a``;
   ``c = a + E_j``, compressed the same way with one scale;
   ``E_j = c - compressed``;
4. one all-gather gives every device every server's signs and scale: the
   mean momentum, identical on every device.

Per device and step that is ``2 (N - 1) / N x P / 8`` bytes of signs (plus
``8 (N - 1)`` of scales), against ``2 (N - 1) / N x 4 P`` for the all-reduce of
a float32 gradient: 1/32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import _quant
from .. import _update
from .._packed import Packed

SCALE_BYTES = 4  # a float32 scale travels as 4 bytes after its chunk's signs


def padded_size(size: int, n: int) -> int:
  """The flat length: ``size`` rounded up to a multiple of ``8 n`` (whole
  bytes of signs in each of the ``n`` chunks)."""
  return -(-max(size, 1) // (8 * n)) * 8 * n


def chunk_counts(size: int, n: int) -> np.ndarray:
  """How many of each chunk's ``padded_size / n`` elements are not padding."""
  c = padded_size(size, n) // n
  return np.clip(size - c * np.arange(n), 0, c).astype(np.int32)


def compress(x: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sign compression of the rows of ``x`` (``(k, C)`` float32).

  Args:
    x: the rows, zero where they are padding.
    counts: ``(k,)`` int, each row's elements that are not padding (the
      first ``counts[r]``).

  Returns:
    ``(message, approx)``: ``message`` is ``(k, C / 8 + 4)`` uint8, each
    row's signs packed 8 per byte (1: non-negative) and then its float32
    scale ``|row|_2 / sqrt(count)`` as 4 bytes; ``approx`` is what the
    message decodes to (:func:`decompress`), zero on the padding.
  """
  c = x.shape[-1]
  valid = jnp.arange(c)[None, :] < counts[:, None]
  scales = jnp.sqrt(jnp.sum(x * x, axis=-1)) / jnp.sqrt(
      jnp.maximum(counts, 1).astype(jnp.float32))
  signs = x >= 0
  message = jnp.concatenate(
      [jnp.packbits(signs, axis=-1),
       jax.lax.bitcast_convert_type(scales, jnp.uint8)], axis=-1)
  approx = jnp.where(valid, jnp.where(signs, scales[:, None], -scales[:, None]), 0.0)
  return message, approx


def decompress(message: jax.Array, counts: jax.Array) -> jax.Array:
  """The ``(k, C)`` float32 rows of ``(k, C / 8 + 4)`` messages (see
  :func:`compress`), zero on the padding."""
  c = (message.shape[-1] - SCALE_BYTES) * 8
  signs = jnp.unpackbits(message[:, :-SCALE_BYTES], axis=-1, count=c).astype(bool)
  scales = jax.lax.bitcast_convert_type(message[:, -SCALE_BYTES:], jnp.float32)
  valid = jnp.arange(c)[None, :] < counts[:, None]
  return jnp.where(valid, jnp.where(signs, scales[:, None], -scales[:, None]), 0.0)


def compressed_mean(m: jax.Array, worker_error: jax.Array, server_error: jax.Array,
                    axis: str, size: int, n: int):
  """The mean over the ``n`` devices of ``axis`` of ``m`` (see the module
  docstring), from inside ``shard_map``.

  Args:
    m: this device's flat momentum, ``(padded_size(size, n),)`` float32.
    worker_error: this device's worker error feedback, shaped like ``m``.
    server_error: this device's server error feedback, ``(C,)``.
    axis: the mesh axis.
    size: elements of ``m`` that are not padding.
    n: devices on ``axis``.

  Returns:
    ``(mean, worker_error, server_error)``: the mean (the same on every
    device) and the new error feedback.
  """
  counts = jnp.asarray(chunk_counts(size, n))
  c = m.shape[0] // n
  x = (m + worker_error).reshape(n, c)
  message, approx = compress(x, counts)
  worker_error = (x - approx).reshape(-1)
  # Row k of the result: device k's chunk for this device (the server).
  received = jax.lax.all_to_all(message, axis, 0, 0, tiled=True)
  mine = counts[jax.lax.axis_index(axis)][None]
  mean = jnp.mean(decompress(received, jnp.broadcast_to(mine, (n,))), axis=0)
  x = mean + server_error
  message, approx = compress(x[None], mine)
  server_error = x - approx[0]
  gathered = jax.lax.all_gather(message[0], axis, tiled=False)
  return decompress(gathered, counts).reshape(-1), worker_error, server_error


def _as_tree(x):
  """Float moments (quantized ones decoded) as a tree shaped like the
  params (packed ones unpacked)."""
  x = jax.tree.map(_quant.decode, x, is_leaf=lambda v: isinstance(v, _quant.QArray))
  return x.layout.unpack(x) if isinstance(x, Packed) else x


@dataclasses.dataclass
class SignExchange:
  """1-bit Adam's momentum exchange, handed to the jadam optimizer as the
  extra argument ``jadam_momentum_exchange`` of its update.

  Its :meth:`exchange` turns the local gradient into the one whose moment
  update gives the exchanged mean momentum, and freezes ``nu``; the new error
  feedback is left in ``worker_error`` and ``server_error``.

  Attributes:
    axis: the mesh axis.
    n: devices on it.
    frozen_at: the step ``nu`` froze at (the last warm-up step).
    worker_error: this device's worker error feedback (replaced by the new
      one when :meth:`exchange` runs).
    server_error: this device's server error feedback (likewise).
    calls: how many jadam optimizers called it while the step traced.
  """

  axis: str
  n: int
  frozen_at: int
  worker_error: jax.Array
  server_error: jax.Array
  calls: int = 0

  def exchange(self, spec, state, updates):
    """``(gradient, rule)`` for the jadam optimizer ``spec`` at ``state``
    (its own state: ``count``, ``mu``, ...) given this device's ``updates``."""
    self.calls += 1
    packed = updates.layout if isinstance(updates, Packed) else None
    grads = _as_tree(updates)
    leaves, treedef = jax.tree.flatten(grads)
    mus = treedef.flatten_up_to(_as_tree(state.mu))
    b1 = _update.evaluate_schedules(spec.hyper(), state.count).b1
    b1 = jnp.asarray(b1, jnp.float32)
    # The local momentum, as the rule computes it.
    local = [(1 - b1) * g.astype(jnp.float32) + b1 * mu.astype(jnp.float32)
             for g, mu in zip(leaves, mus)]
    size = sum(x.size for x in local)
    flat = jnp.concatenate([x.reshape(-1) for x in local]
                           + [jnp.zeros((padded_size(size, self.n) - size,), jnp.float32)])
    mean, worker_error, server_error = compressed_mean(
        flat, self.worker_error, self.server_error, self.axis, size, self.n)
    # A NaN or inf in any device's momentum reaches every device's mean (the
    # scales carry it): then the error feedback stays as it was, everywhere
    # alike, and the optimizer's skip_nonfinite can skip the step cleanly.
    ok = jnp.all(jnp.isfinite(mean))
    self.worker_error = jnp.where(ok, worker_error, self.worker_error)
    self.server_error = jnp.where(ok, server_error, self.server_error)
    # The gradient whose moment update (1 - b1) g + b1 mu is the mean momentum:
    # identical on every device, like the mean gradient of the warm-up.
    out, start = [], 0
    for g, mu in zip(leaves, mus):
      m = mean[start:start + g.size].reshape(g.shape)
      start += g.size
      out.append(((m - b1 * mu.astype(jnp.float32)) / (1 - b1)).astype(g.dtype))
    grads = jax.tree.unflatten(treedef, out)
    if packed is not None:
      grads = packed.pack(grads)
    return grads, dataclasses.replace(spec.rule, nu_frozen_at=self.frozen_at)
