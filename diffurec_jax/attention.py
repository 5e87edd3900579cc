"""Multi-head attention with key-padding and causal masks (self- and cross-attention).

Shapes: queries [B, Lq, H], keys/values [B, Lk, H], mask [B, Lq, Lk] bool (True = may attend).
Softmax runs in float32 over the key axis; masked logits get a large finite negative value so
fully-masked rows (padding queries under a causal mask) stay finite and never produce NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_MASKED = -1e9


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `key` is None (evaluation) or `rate` is 0."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_key(key: jax.Array | None, num: int):
  """`num` keys from `key`, or `num` Nones in evaluation."""
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def attention_mask(key_mask: jax.Array, query_len: int, *, mask_padding_keys: bool,
                   causal: bool) -> jax.Array | None:
  """Boolean mask [B, Lq, Lk] from the key validity mask [B, Lk].

  Queries are the last `query_len` positions of the sequence (the full sequence when
  query_len == Lk; the last position alone when only x0_hat is needed).
  """
  batch, key_len = key_mask.shape
  mask = None
  if mask_padding_keys:
    mask = jnp.broadcast_to(key_mask[:, None, :], (batch, query_len, key_len))
  if causal:
    query_pos = jnp.arange(key_len - query_len, key_len)[:, None]
    allowed = query_pos >= jnp.arange(key_len)[None, :]
    mask = allowed[None] if mask is None else mask & allowed[None]
  return mask


class MultiHeadAttention(nnx.Module):
  """Scaled dot-product attention over `num_heads` heads, output projection Xavier-normal."""

  def __init__(self, hidden: int, num_heads: int, dropout_rate: float, *, rngs: nnx.Rngs):
    if hidden % num_heads:
      raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}.")
    self.num_heads = num_heads
    self.dropout_rate = dropout_rate
    self.query = nnx.Linear(hidden, hidden, rngs=rngs)
    # No key bias: softmax over keys is invariant to it, so its gradient is pure rounding noise
    # that Adam would amplify into steps.
    self.key = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, hidden, kernel_init=nnx.initializers.xavier_normal(), rngs=rngs)

  def __call__(self, queries, keys_values, mask, key=None):
    """queries [B, Lq, H], keys_values [B, Lk, H], mask [B|1, Lq, Lk] or None -> [B, Lq, H]."""
    batch, query_len, hidden = queries.shape
    head_dim = hidden // self.num_heads

    def heads(x):
      return x.reshape(x.shape[0], x.shape[1], self.num_heads, head_dim)

    q = heads(self.query(queries))
    k = heads(self.key(keys_values))
    v = heads(self.value(keys_values))
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = dropout(weights, self.dropout_rate, key)
    context = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(batch, query_len, hidden)
    return self.out(context)
