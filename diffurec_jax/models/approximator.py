"""The Transformer approximator f_theta: a stack of pre-LN blocks, x + Drop(f(LN(x))).

Each block is [cross-attention ->] self-attention -> feed-forward, each block consuming the
previous block's output (unlike the DiffuRecSys code, where every block read the original
input, so 3 of 4 blocks were dead). Cross-attention (DiffuRecSys Eq. 16) takes the target
stream lambda * (x_t + d_t) [B, L, H] as queries and the history [B, L, H] as keys and
values, softmax over the sequence axis (the DiffuRecSys code normalised over heads).

Dropout sites per block, as in the DiffuRec code: attention probabilities, the attention
residual branch, the feed-forward's inner activation, the feed-forward residual branch and,
with `block_output_dropout`, the whole block output (diffurec.py's TransformerBlock); then
LN(Drop(h)) after the last block.

The DiffuRecSys code's approximator is available through switches (the `v1_released` preset):
`cross_form` "linear_heads" (its linear cross-attention, keys normalised over heads, see
attention.LinearAttention), `share_cross_attention_norm` (one LayerNorm before both
attentions, its input_sublayer used twice), `cross_fill_padding_queries` (-1e9 context rows at
padding positions) and `every_block_reads_input` (each block reads the approximator's input,
so only the last block counts).

`last_only=True` computes queries, attention output and feed-forward of the final block for
the last position alone: x0_hat is read there, so the result is identical and cheaper.
"""

from __future__ import annotations

import jax
from flax import nnx

from diffurec_jax.models import attention
from diffurec_jax.models import layers


class FeedForward(nnx.Module):
  """h -> 4h (tanh-GELU) -> h, Xavier-normal weights as in DiffuRec."""

  def __init__(self, hidden: int, dropout_rate: float,
               style: layers.LayerStyle = layers.LayerStyle(), *, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.inner = layers.dense(hidden, 4 * hidden, style, xavier=True, rngs=rngs)
    self.outer = layers.dense(4 * hidden, hidden, style, xavier=True, rngs=rngs)

  def __call__(self, x, key=None):
    hidden = jax.nn.gelu(self.inner(x), approximate=True)
    return self.outer(attention.dropout(hidden, self.dropout_rate, key))


class Block(nnx.Module):
  """One pre-LN block; `cross_attention` adds the DiffuRecSys target cross-attention.

  `cross_form` picks the cross-attention (attention.CROSS_FORMS); `share_cross_norm` reuses the
  self-attention's LayerNorm before the cross-attention (the DiffuRecSys code).
  """

  def __init__(self, hidden: int, num_heads: int, dropout_rate: float, cross_attention: bool,
               style: layers.LayerStyle = layers.LayerStyle(), *,
               output_dropout: bool = True, cross_form: str = "dot_product",
               share_cross_norm: bool = False, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.output_dropout = output_dropout
    if cross_attention:
      self.cross_norm = None if share_cross_norm else layers.layer_norm(hidden, style, rngs=rngs)
      if cross_form == "dot_product":
        self.cross = attention.MultiHeadAttention(hidden, num_heads, dropout_rate, style,
                                                  rngs=rngs)
      else:
        key_axis = {"linear": "sequence", "linear_heads": "heads"}[cross_form]
        self.cross = attention.LinearAttention(hidden, num_heads, dropout_rate, key_axis, style,
                                               rngs=rngs)
    else:
      self.cross_norm = self.cross = None
    self.attention_norm = layers.layer_norm(hidden, style, rngs=rngs)
    self.attention = attention.MultiHeadAttention(hidden, num_heads, dropout_rate, style,
                                                  rngs=rngs)
    self.ffn_norm = layers.layer_norm(hidden, style, rngs=rngs)
    self.ffn = FeedForward(hidden, dropout_rate, style, rngs=rngs)

  def __call__(self, h, self_mask, query_len: int, target=None, cross_masks=(None, None),
               key=None):
    """h [B, L, H]; target [B, L, H] or None; self_mask [B, Lq, L] -> [B, query_len, H].

    cross_masks: what the cross-attention takes after its inputs, (key mask, query fill):
    ([B, L, L] or None, [B, L] or None) for dot product, ([B, L] or None, [B, L] or None) for
    the linear forms.
    """
    keys = attention.split_key(key, 7)
    rate = self.dropout_rate
    if self.cross is not None:
      norm = self.attention_norm if self.cross_norm is None else self.cross_norm
      attended = self.cross(target, norm(h), *cross_masks, key=keys[0])
      h = h + attention.dropout(attended, rate, keys[1])
    normed = self.attention_norm(h)
    attended = self.attention(normed[:, -query_len:], normed, self_mask, key=keys[2])
    h = h[:, -query_len:] + attention.dropout(attended, rate, keys[3])
    h = h + attention.dropout(self.ffn(self.ffn_norm(h), keys[4]), rate, keys[5])
    return attention.dropout(h, rate, keys[6]) if self.output_dropout else h


class Approximator(nnx.Module):
  """num_blocks blocks, then LN(Drop(h))."""

  def __init__(self, hidden: int, num_blocks: int, num_heads: int, dropout_rate: float, *,
               cross_attention: bool, mask_padding_keys: bool, causal: bool,
               mask_padding_queries: bool = False, block_output_dropout: bool = True,
               cross_form: str = "dot_product", share_cross_attention_norm: bool = False,
               cross_fill_padding_queries: bool = False, every_block_reads_input: bool = False,
               style: layers.LayerStyle = layers.LayerStyle(), rngs: nnx.Rngs):
    if cross_form not in attention.CROSS_FORMS:
      raise ValueError(f"model.cross_attention_form={cross_form!r}; use one of "
                       f"{attention.CROSS_FORMS}.")
    self.dropout_rate = dropout_rate
    self.mask_padding_keys = mask_padding_keys
    self.mask_padding_queries = mask_padding_queries
    self.causal = causal
    self.cross_form = cross_form
    self.cross_fill_padding_queries = cross_fill_padding_queries
    self.every_block_reads_input = every_block_reads_input
    self.blocks = nnx.List([
        Block(hidden, num_heads, dropout_rate, cross_attention, style,
              output_dropout=block_output_dropout, cross_form=cross_form,
              share_cross_norm=share_cross_attention_norm, rngs=rngs)
        for _ in range(num_blocks)])
    self.final_norm = layers.layer_norm(hidden, style, rngs=rngs)

  def __call__(self, h, key_mask, target=None, *, last_only: bool, key=None):
    """h [B, L, H], key_mask [B, L] bool, target [B, L, H] or None -> [B, L or 1, H]."""
    length = h.shape[1]
    masks = {q: attention.attention_mask(key_mask, q, mask_padding_keys=self.mask_padding_keys,
                                         causal=self.causal,
                                         mask_padding_queries=self.mask_padding_queries)
             for q in {length, 1}}
    # Cross-attention reads the whole history of every position: key padding only.
    if self.cross_form == "dot_product":
      cross_keys = attention.attention_mask(key_mask, length,
                                            mask_padding_keys=self.mask_padding_keys,
                                            causal=False)
    else:
      cross_keys = key_mask if self.mask_padding_keys else None
    cross_masks = (cross_keys, key_mask if self.cross_fill_padding_queries else None)
    keys = attention.split_key(key, len(self.blocks) + 1)
    approximator_input = h
    for index, block in enumerate(self.blocks):
      query_len = 1 if last_only and index == len(self.blocks) - 1 else length
      # The DiffuRecSys code feeds every block the input: XLA drops the blocks before the last.
      block_input = approximator_input if self.every_block_reads_input else h
      h = block(block_input, masks[query_len], query_len, target, cross_masks, keys[index])
    return self.final_norm(attention.dropout(h, self.dropout_rate, keys[-1]))
