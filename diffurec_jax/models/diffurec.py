"""DiffuRec / DiffuRecSys: the NNX module and the pure functions around it.

Shapes: history [B, L] int32 (left-padded, 0 = padding, last column = most recent item),
x_t [B, H], t [B] int32 (original training timestep), targets [B] int32, weights [B] float.

The functions here take a `Bundle(graphdef, params)` (models/bundle.py), so they are pure
and `merge` the module inside `jax.jit`, `vmap` and `lax.scan` without retracing.

  e     = LayerNorm(Dropout_0.3(E[history] + P[recency]))    (positions optional)
  d_t   = MLP(sinusoidal(t * 1000 / T))
  x0_hat = Approximator(mix(e, lambda, x_t + d_t))[last position]
  loss  = CE(x0_hat . E^T, target) over items 1..N (padding column excluded; with
          model.loss_padding_column over all N+1 columns, as the DiffuRec code)
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
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import layers
from diffurec_jax.models import mixing
from diffurec_jax import diffusion


def recency_positions(length: int) -> jax.Array:
  """[L] position index counted from the most recent item (last column = 0).

  Counting from the end makes the result independent of how much left padding a batch has,
  which is what lets length buckets reproduce the fully padded computation.
  """
  return jnp.arange(length - 1, -1, -1)


def item_init(key, num_items: int, hidden: int, std: float, table_rows: int = 0) -> jax.Array:
  """The item table ~ N(0, std^2) [N+1, H], zero rows appended up to `table_rows` (a table
  sharded over devices: catalog.table_rows); the same draw for every row count."""
  table = std * jax.random.normal(key, (num_items + 1, hidden))
  extra = max(table_rows - (num_items + 1), 0)
  return jnp.pad(table, ((0, extra), (0, 0))) if extra else table


class DiffuRec(nnx.Module):
  """Item table, positions, step embedding and the approximator (DiffuRec or V1/V2)."""

  def __init__(self, num_items: int, max_len: int, model_config, *, rngs: nnx.Rngs,
               table_rows: int = 0):
    hidden = model_config.hidden
    if model_config.mixing not in mixing.MIXINGS:
      raise ValueError(f"model.mixing={model_config.mixing!r}; use one of {mixing.MIXINGS}.")
    self.num_train_steps = model_config.diffusion_steps
    self.mixing = model_config.mixing
    self.lambda_mean = model_config.lambda_mean
    self.lambda_std = model_config.lambda_std
    self.emb_dropout = model_config.emb_dropout
    self.score_scale = float(model_config.score_scale)
    self.loss_padding_column = bool(model_config.loss_padding_column)
    style = layers.LayerStyle.from_config(model_config)
    self.num_items = num_items
    self.item_embedding = nnx.Param(item_init(rngs.params(), num_items, hidden,
                                              model_config.item_init_std, table_rows))
    self.position_embedding = (
        nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, hidden)))
        if model_config.position_embedding else None)
    self.embedding_norm = layers.layer_norm(hidden, style, rngs=rngs)
    self.step_inner = layers.dense(hidden, 4 * hidden, style, rngs=rngs)
    self.step_outer = layers.dense(4 * hidden, hidden, style, rngs=rngs)
    self.approximator = approximator_lib.Approximator(
        hidden, model_config.num_blocks, model_config.num_heads, model_config.dropout,
        cross_attention=model_config.mixing == "cross_attention",
        mask_padding_keys=model_config.mask_padding_keys, causal=model_config.causal,
        mask_padding_queries=model_config.mask_padding_queries,
        block_output_dropout=model_config.block_output_dropout,
        cross_form=model_config.cross_attention_form,
        share_cross_attention_norm=model_config.share_cross_attention_norm,
        cross_fill_padding_queries=model_config.cross_fill_padding_queries,
        every_block_reads_input=model_config.every_block_reads_input, style=style, rngs=rngs)

  def embed_history(self, history, key=None):
    """history [B, L] -> (e [B, L, H], key_mask [B, L] bool). Independent of x_t."""
    e = catalog.lookup(self.item_embedding[...], history)
    if self.position_embedding is not None:
      e = e + self.position_embedding[...][recency_positions(history.shape[1])]
    e = self.embedding_norm(attention.dropout(e, self.emb_dropout, key))
    return e, history > 0

  def step_embedding(self, t):
    """t [B] original timesteps -> d_t [B, H]."""
    hidden = self.step_inner.in_features
    base = diffusion.sinusoidal_embedding(t, hidden, self.num_train_steps)
    return self.step_outer(jax.nn.silu(self.step_inner(base)))

  def draw_lambdas(self, key, shape):
    """lambda ~ N(lambda_mean, lambda_std) of `shape` [B, L, H]."""
    return mixing.draw_lambda(key, shape, self.lambda_mean, self.lambda_std)

  def approximate(self, e, key_mask, x_t, t, lambdas, dropout_key=None):
    """x0_hat [B, H] from the embedded history e [B, L, H], x_t [B, H], lambdas [B, L, H]."""
    d_t = self.step_embedding(t)
    if self.mixing == "add":
      h, target = mixing.additive(e, x_t, d_t, lambdas), None
    else:
      h, target = e, mixing.target_stream(x_t, d_t, lambdas)
    out = self.approximator(h, key_mask, target, last_only=True, key=dropout_key)
    return out[:, -1]


def item_table(bundle: bundle_lib.Bundle) -> jax.Array:
  """[N+1, H] item embedding table (row 0 = padding)."""
  return bundle.params["item_embedding"][...]


def score_scale(bundle: bundle_lib.Bundle) -> float:
  """The static logit multiplier of `bundle`'s model (1.0 = the papers' plain dot product)."""
  return getattr(bundle_lib.merge(bundle), "score_scale", 1.0)


def score(x0, table, scale: float = 1.0, *, keep_padding: bool = False) -> jax.Array:
  """Rounding: scale * x0 [..., H] . table[N+1, H]^T -> [..., N+1], padding column at -inf.

  `scale` only sharpens or flattens the softmax: the ranking of one chain never depends on it.
  `keep_padding` leaves the padding column's logit in place (the DiffuRec code's loss);
  rankings never use it.
  """
  scores = jnp.einsum("...h,nh->...n", x0, table.astype(x0.dtype)).astype(jnp.float32)
  if scale != 1.0:
    scores = scores * scale
  return scores if keep_padding else scores.at[..., 0].set(-jnp.inf)


def denoise(bundle: bundle_lib.Bundle, history, x_t, t, rng, train: bool = False):
  """x0_hat [B, H] = f_theta(history, x_t, t); dropout only when `train`."""
  model = bundle_lib.merge(bundle)
  lambda_key, embed_key, block_key = jax.random.split(rng, 3)
  e, key_mask = model.embed_history(history, embed_key if train else None)
  lambdas = model.draw_lambdas(lambda_key, e.shape)
  return model.approximate(e, key_mask, x_t, t, lambdas, block_key if train else None)


def weighted_cross_entropy(logits, targets, weights):
  """Mean over weighted rows of softmax CE; logits [B, N+1] (padding at -inf)."""
  # Padded rows (weight 0) may carry label 0, whose logit is -inf: never let it reach the sum.
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 1))
  return weighted_mean(losses, weights)


def weighted_mean(losses, weights):
  """Mean of per-row losses [B] over the rows of weight > 0 (padded rows never count)."""
  return jnp.sum(jnp.where(weights > 0, losses, 0.0)) / jnp.maximum(jnp.sum(weights), 1.0)


def loss_weight(batch) -> jax.Array:
  """The denominator of diffusion_loss's weighted mean: the batch's real rows."""
  return jnp.sum(batch["weights"])


def diffusion_loss(params, graphdef, batch, rng, schedule, noise_config, block: int = 0,
                   sampled: sampled_softmax.Sampled | None = None):
  """Algorithm 1: one CE loss on a batch {history [B, L], targets [B], weights [B]}.

  `noise_config` = (mode, delta_c, scale) for the offset noise of the forward process; `block`
  > 0 computes the softmax over the items in blocks of that many rows, `sampled` replaces it
  by a sampled softmax (the batch's targets and M drawn negatives; catalog.py).
  """
  bundle = bundle_lib.Bundle(graphdef, params)
  t_key, noise_key, model_key = jax.random.split(rng, 3)
  targets = batch["targets"]
  batch_size = targets.shape[0]
  table = item_table(bundle)
  x0 = catalog.lookup(table, targets)
  t = jax.random.randint(t_key, (batch_size,), 0, schedule.betas.shape[0])
  mode, delta_c, scale = noise_config
  eps = diffusion.training_noise(noise_key, x0.shape, mode, delta_c, scale)
  x_t = diffusion.q_sample(schedule, x0, t, eps)
  x0_hat = denoise(bundle, batch["history"], x_t, schedule.timesteps[t], model_key, train=True)
  model = bundle_lib.merge(bundle)
  if sampled is not None:
    losses = sampled_softmax.sampled_cross_entropy(
        x0_hat, table, jnp.maximum(targets, 1), targets, jax.random.fold_in(rng, 1), sampled,
        model.score_scale)
    return weighted_mean(losses, batch["weights"])
  if block:
    spec = catalog.Spec(model.num_items, block, model.score_scale)
    losses = catalog.cross_entropy(x0_hat, table, jnp.maximum(targets, 1), spec,
                                   include_padding=model.loss_padding_column)
    return weighted_mean(losses, batch["weights"])
  logits = score(x0_hat, table, model.score_scale, keep_padding=model.loss_padding_column)
  return weighted_cross_entropy(logits, targets, batch["weights"])
