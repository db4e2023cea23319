"""A small Flax (linen) decoder-only transformer for the full-training-step case."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import optax


class Block(nn.Module):
  """Pre-norm transformer block: causal self-attention and a GELU MLP."""

  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.d_ff)(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model)(h)
    return x + h


class TransformerLM(nn.Module):
  """Token and position embeddings, ``num_layers`` blocks, a final norm and logits."""

  vocab: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  seq_len: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d_model)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.seq_len, self.d_model))
    x = x + pos[: tokens.shape[1]]
    for _ in range(self.num_layers):
      x = Block(self.d_model, self.num_heads, self.d_ff)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab)(x)


def next_token_loss(model: TransformerLM, params, tokens):
  """Mean next-token cross-entropy of ``tokens`` (batch, seq)."""
  logits = model.apply(params, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
