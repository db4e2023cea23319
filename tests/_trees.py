"""Shared test helpers: pytrees of several shapes and deterministic gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def nested_tree(dtype=jnp.float32):
  """Nested dicts/lists/tuples, a scalar, a zero-size array and a None leaf."""
  rng = np.random.default_rng(0)
  r = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  return {
      "dense": {"w": r(4, 3), "b": r(3)},
      "blocks": [(r(2, 2), r(5)), (r(1), None)],
      "scale": r(),
      "empty": jnp.zeros((0, 3), dtype),
  }


def wide_tree(dtype=jnp.float32, n_leaves: int = 70):
  """A tree of many small leaves of varied shapes (by default more than one
  kernel call takes, ``jadam._kernel.GROUP``)."""
  rng = np.random.default_rng(1)
  shapes = [(3,), (2, 4), (5,), (1, 1, 3), ()]
  return {
      f"layer_{i:03d}": jnp.asarray(rng.normal(size=shapes[i % len(shapes)]), dtype)
      for i in range(n_leaves)
  }


TREES = {"nested": nested_tree, "wide": wide_tree}


def grads_like(tree, step: int, scale: float = 1.0):
  """Deterministic pseudo-random gradients shaped like ``tree`` (None kept)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(42), step), max(len(leaves), 1))
  out = [scale * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def grad_sequence(tree, n_steps: int):
  """``n_steps`` gradients stacked on a leading axis (for ``lax.scan``).

  Some steps are exactly zero, to exercise zero-gradient handling.
  """
  gs = [grads_like(tree, i) if i % 7 != 3 else jax.tree.map(jnp.zeros_like, tree)
        for i in range(n_steps)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *gs)


def adam_node(state):
  """The moments node of an optimizer state: optax's ``ScaleByAdamState`` /
  ``ScaleByAmsgradState`` inside jadam's (and optax's) optimizer states, or a
  functional ``jadam.AdamState`` itself."""
  nodes = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
           if hasattr(s, "mu")]
  assert nodes, f"no moments in {state}"
  return nodes[0]


def side_by_side(tx, ref, params, grads_fn, steps: int):
  """``steps`` jitted updates of ``tx`` and of the reference ``ref`` from the
  same params, gradient ``grads_fn(step)`` each: ``(params, state, ref_params,
  ref_state)``."""
  import optax  # pylint: disable=import-outside-toplevel

  s, rs, p, rp = tx.init(params), ref.init(params), params, params
  step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
  for t in range(steps):
    g = grads_fn(t)
    u, s = step(g, s, p)
    ru, rs = ref_step(g, rs, rp)
    p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ru)
  return p, s, rp, rs
