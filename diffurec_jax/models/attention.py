"""Multi-head attention with padding and causal masks (self- and cross-attention).

Shapes: queries [B, Lq, H], keys/values [B, Lk, H], mask [B, Lq, Lk] bool (True = may attend).
Softmax runs in float32 over the key axis; masked logits get a large finite negative value so
fully-masked rows stay finite and never produce NaN: such a row attends uniformly to every
key. Two padding conventions:
  keys     (ours) a padding position is never read: masked columns.
  queries  (the DiffuRec code) a padding position's own row is masked: it attends uniformly to
           every position, real items included, while real queries read every key, padding
           included (its mask is built from the query side, diffurec.py's Transformer).

`LinearAttention` is the cross-attention of the DiffuRecSys code: the "efficient attention"
form softmax(q) (softmax(k)^T v), which normalises q over each head's features and k over the
sequence; that code normalises k over the heads axis instead (`CROSS_FORMS`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffurec_jax.models import layers

_MASKED = -1e9
# Cross-attention forms: scaled dot product (ours), linear with keys normalised over the sequence
# (efficient attention as designed), linear with keys normalised over the heads axis (the
# DiffuRecSys code, diffurec.py's CrossAttention: F.softmax(k, dim=1) on [B, heads, L, d]).
CROSS_FORMS = ("dot_product", "linear", "linear_heads")


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `key` is None (evaluation) or `rate` is 0.

  The keep mask comes from a counter-based hash (murmur3's 32-bit finaliser of the element
  index and one seed drawn from `key`), not from threefry bits per element: on a CPU,
  threefry for the ~22 dropout sites of a DiffuRec step cost a third of the training step
  (measured: 666 -> 1,018 examples/s on Toys, docs/performance.md). Masks are uniform to
  2^-32 and differ with every key; dropout needs nothing stronger.
  """
  if key is None or rate <= 0.0:
    return x
  keep = hash_uniform_bits(key, x.shape) >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def hash_uniform_bits(key: jax.Array, shape) -> jax.Array:
  """uint32 [shape] pseudo-random bits: fmix32(index * golden ratio + seed(key))."""
  seed = jax.random.bits(key, (), jnp.uint32)
  size = math.prod(shape)
  bits = jax.lax.iota(jnp.uint32, size).reshape(shape) * jnp.uint32(0x9E3779B9) + seed
  bits = bits ^ (bits >> 16)
  bits = bits * jnp.uint32(0x85EBCA6B)
  bits = bits ^ (bits >> 13)
  bits = bits * jnp.uint32(0xC2B2AE35)
  return bits ^ (bits >> 16)


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


def _init_projections(module, hidden: int, num_heads: int, dropout_rate: float,
                      style: layers.LayerStyle, rngs: nnx.Rngs):
  """Query/key/value projections [H -> H] and the Xavier-normal output projection."""
  if hidden % num_heads:
    raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}.")
  module.num_heads = num_heads
  module.dropout_rate = dropout_rate
  module.query = layers.dense(hidden, hidden, style, rngs=rngs)
  module.key = layers.dense(hidden, hidden, style, use_bias=style.key_bias, rngs=rngs)
  module.value = layers.dense(hidden, hidden, style, rngs=rngs)
  module.out = layers.dense(hidden, hidden, style, xavier=True, rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Scaled dot-product attention over `num_heads` heads, output projection Xavier-normal."""

  def __init__(self, hidden: int, num_heads: int, dropout_rate: float,
               style: layers.LayerStyle = layers.LayerStyle(), *, rngs: nnx.Rngs):
    # No key bias by default: softmax over keys is invariant to it, so its gradient is pure
    # rounding noise that Adam would amplify into steps (the DiffuRec code has one).
    _init_projections(self, hidden, num_heads, dropout_rate, style, rngs)

  def __call__(self, queries, keys_values, mask, query_fill=None, key=None):
    """queries [B, Lq, H], keys_values [B, Lk, H], mask [B|1, Lq, Lk] or None -> [B, Lq, H].

    query_fill [B, Lq] bool or None: rows where it is False get the context -1e9 before the
    output projection (the DiffuRecSys code's cross-attention does this to padding queries).
    """
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
    context = jnp.einsum("bnqk,bknd->bqnd", weights, v)
    if query_fill is not None:
      context = jnp.where(query_fill[:, :, None, None], context, jnp.asarray(_MASKED, v.dtype))
    return self.out(context.reshape(batch, query_len, hidden))


class LinearAttention(nnx.Module):
  """Linear ("efficient") attention: softmax(q) (softmax(k)^T v), per head, no 1/sqrt(d).

  q is normalised over each head's features; k over the key sequence (`key_axis="sequence"`)
  or, as the DiffuRecSys code does, over the heads axis (`key_axis="heads"`), which makes every
  key position's weights sum to 1 across heads and leaves the sum over positions unnormalised.
  Dropout acts on the per-head context rows (there are no attention probabilities).
  """

  def __init__(self, hidden: int, num_heads: int, dropout_rate: float, key_axis: str,
               style: layers.LayerStyle = layers.LayerStyle(), *, rngs: nnx.Rngs):
    if key_axis not in ("sequence", "heads"):
      raise ValueError(f"key_axis={key_axis!r}; use 'sequence' or 'heads'.")
    self.key_axis = key_axis
    # Unlike a softmax over keys, nothing cancels a key bias here.
    _init_projections(self, hidden, num_heads, dropout_rate, style, rngs)

  def key_weights(self, keys_values, key_valid=None) -> jax.Array:
    """Normalised keys [B, Lk, n, d] float32; padding positions (key_valid False) weigh 0."""
    batch, key_len, hidden = keys_values.shape
    k = self.key(keys_values).reshape(batch, key_len, self.num_heads, hidden // self.num_heads)
    k = k.astype(jnp.float32)
    if self.key_axis == "heads":
      weights = jax.nn.softmax(k, axis=2)
      return weights if key_valid is None else weights * key_valid[:, :, None, None]
    if key_valid is not None:
      k = jnp.where(key_valid[:, :, None, None], k, _MASKED)
    return jax.nn.softmax(k, axis=1)

  def __call__(self, queries, keys_values, key_valid=None, query_fill=None, key=None):
    """queries [B, Lq, H], keys_values [B, Lk, H] -> [B, Lq, H].

    key_valid [B, Lk] bool or None: keys that may be read. query_fill [B, Lq] bool or None:
    rows where it is False get the context -1e9 before the output projection (the DiffuRecSys
    code's masked_fill on its padding query rows).
    """
    batch, query_len, hidden = queries.shape
    head_dim = hidden // self.num_heads
    q = self.query(queries).reshape(batch, query_len, self.num_heads, head_dim)
    v = self.value(keys_values).reshape(batch, -1, self.num_heads, head_dim)
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1).astype(v.dtype)
    k = self.key_weights(keys_values, key_valid).astype(v.dtype)
    summary = jnp.einsum("bkni,bknj->bnij", k, v)  # [B, n, d, d]
    context = jnp.einsum("bqni,bnij->bqnj", q, summary)
    if query_fill is not None:
      context = jnp.where(query_fill[:, :, None, None], context, jnp.asarray(_MASKED, v.dtype))
    context = dropout(context, self.dropout_rate, key)
    return self.out(context.reshape(batch, query_len, hidden))
