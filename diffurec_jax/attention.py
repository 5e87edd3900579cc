"""Multi-head attention with padding and causal masks (self- and cross-attention).

Shapes: queries [B, Lq, H], keys/values [B, Lk, H], mask [B, Lq, Lk] bool (True = may attend).
Softmax runs in float32 over the key axis; masked logits get a large finite negative value so
fully-masked rows stay finite and never produce NaN: such a row attends uniformly to every
key. Two padding conventions:
  keys     (ours) a padding position is never read: masked columns.
  queries  (the DiffuRec code) a padding position's own row is masked: it attends uniformly to
           every position, real items included, while real queries read every key, padding
           included (its mask is built from the query side, diffurec.py's Transformer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffurec_jax import layers

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
                   causal: bool, mask_padding_queries: bool = False) -> jax.Array | None:
  """Boolean mask [B, Lq, Lk] from the position validity mask [B, Lk].

  Queries are the last `query_len` positions of the sequence (the full sequence when
  query_len == Lk; the last position alone when only x0_hat is needed).
  """
  batch, key_len = key_mask.shape
  mask = None
  if mask_padding_keys:
    mask = jnp.broadcast_to(key_mask[:, None, :], (batch, query_len, key_len))
  if mask_padding_queries:
    rows = jnp.broadcast_to(key_mask[:, -query_len:, None], (batch, query_len, key_len))
    mask = rows if mask is None else mask & rows
  if causal:
    query_pos = jnp.arange(key_len - query_len, key_len)[:, None]
    allowed = query_pos >= jnp.arange(key_len)[None, :]
    mask = allowed[None] if mask is None else mask & allowed[None]
  return mask


class MultiHeadAttention(nnx.Module):
  """Scaled dot-product attention over `num_heads` heads, output projection Xavier-normal."""

  def __init__(self, hidden: int, num_heads: int, dropout_rate: float,
               style: layers.LayerStyle = layers.LayerStyle(), *, rngs: nnx.Rngs):
    if hidden % num_heads:
      raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}.")
    self.num_heads = num_heads
    self.dropout_rate = dropout_rate
    self.query = layers.dense(hidden, hidden, style, rngs=rngs)
    # No key bias by default: softmax over keys is invariant to it, so its gradient is pure
    # rounding noise that Adam would amplify into steps (the DiffuRec code has one).
    self.key = layers.dense(hidden, hidden, style, use_bias=style.key_bias, rngs=rngs)
    self.value = layers.dense(hidden, hidden, style, rngs=rngs)
    self.out = layers.dense(hidden, hidden, style, xavier=True, rngs=rngs)

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
