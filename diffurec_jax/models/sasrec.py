"""SASRec trained with full softmax cross-entropy: the honest baseline.

Causal self-attention over the history with learned positions (counted from the most recent
item), trained on every position of each user's training sequence against all items; scored
at the last position with the shared item table, in the same evaluator as DiffuRec.

Shapes: history [B, L] int32 left-padded, next_items [B, L] int32 (0 = no target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffurec_jax import catalog
from diffurec_jax import sampled_softmax
from diffurec_jax.models import approximator as approximator_lib
from diffurec_jax.models import attention
from diffurec_jax.models import layers
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib


class SASRec(nnx.Module):

  def __init__(self, num_items: int, max_len: int, model_config, *, rngs: nnx.Rngs,
               table_rows: int = 0):
    hidden = model_config.hidden
    self.emb_dropout = model_config.emb_dropout
    self.num_items = num_items
    self.item_embedding = nnx.Param(model_lib.item_init(rngs.params(), num_items, hidden, 0.02,
                                                        table_rows))
    self.position_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                                 (max_len, hidden)))
    style = layers.LayerStyle.from_config(model_config)
    self.embedding_norm = layers.layer_norm(hidden, style, rngs=rngs)
    # SASRec's blocks have no dropout on the whole block output (DiffuRec's do).
    self.approximator = approximator_lib.Approximator(
        hidden, model_config.num_blocks, model_config.num_heads, model_config.dropout,
        cross_attention=False, mask_padding_keys=True, causal=True,
        block_output_dropout=False, style=style, rngs=rngs)

  def __call__(self, history, *, last_only: bool, key=None):
    """history [B, L] -> hidden states [B, L or 1, H]."""
    embed_key, block_key = attention.split_key(key, 2)
    e = catalog.lookup(self.item_embedding[...], history)
    e = e + self.position_embedding[...][model_lib.recency_positions(history.shape[1])]
    e = attention.dropout(self.embedding_norm(e), self.emb_dropout, embed_key)
    return self.approximator(e, history > 0, None, last_only=last_only, key=block_key)


def sequence_loss(params, graphdef, batch, rng, block: int = 0,
                  sampled: sampled_softmax.Sampled | None = None):
  """CE at every position: batch {history [B, L], next_items [B, L], weights [B]}.

  `block` > 0: the softmax over the items in blocks of that many rows; `sampled`: a sampled
  softmax whose in-batch candidates are each sequence's last next item (catalog.py).
  """
  bundle = bundle_lib.Bundle(graphdef, params)
  model = bundle_lib.merge(bundle)
  hidden = model(batch["history"], last_only=False, key=rng)
  targets = batch["next_items"]
  valid = (targets > 0) * batch["weights"][:, None]
  if sampled is not None:
    losses = sampled_softmax.sampled_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), model_lib.item_table(bundle),
        jnp.maximum(targets, 1).reshape(-1), targets[:, -1], jax.random.fold_in(rng, 1),
        sampled)
    return model_lib.weighted_mean(losses, valid.reshape(-1))
  if block:
    losses = catalog.cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                   model_lib.item_table(bundle),
                                   jnp.maximum(targets, 1).reshape(-1),
                                   catalog.Spec(model.num_items, block))
    return model_lib.weighted_mean(losses, valid.reshape(-1))
  logits = model_lib.score(hidden, model_lib.item_table(bundle))
  # Padding labels would hit the -inf column: give them item 1 and weight 0.
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 1))
  return jnp.sum(jnp.where(valid > 0, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)


def sequence_loss_weight(batch) -> jax.Array:
  """The denominator of sequence_loss's weighted mean: real next-item positions."""
  return jnp.sum((batch["next_items"] > 0) * batch["weights"][:, None])


def last_hidden(bundle, history):
  """Evaluation: [B, H] representation of the next item."""
  return bundle_lib.merge(bundle)(history, last_only=True)[:, -1]
