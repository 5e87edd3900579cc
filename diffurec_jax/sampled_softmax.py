"""A sampled softmax for training on large catalogs (`catalog.loss=sampled`): the batch's own
targets plus M negatives drawn uniformly or by popularity, logQ-corrected, so the loss is a
consistent estimate of the full softmax cross-entropy (catalog.cross_entropy).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffurec_jax import catalog

LOSSES = ("full", "sampled")
NEGATIVE_SAMPLERS = ("uniform", "popularity")


class Sampled(NamedTuple):
  """A sampled softmax: M negatives per step from q, plus the batch's own targets (drawn from
  the data distribution p); q and p as log probabilities over the items [N+1] (-inf at 0)."""
  negatives: int  # M, shared by every row of a step.
  log_q: jax.Array  # [N+1] the negative sampler.
  log_p: jax.Array  # [N+1] the training items' frequency (in-batch candidates).


def sampling_distributions(item_counts, sampler: str) -> tuple:
  """(log q, log p) [N+1] from the training item counts [N+1] (row 0 = padding, never drawn).

  p is the training frequency; q is uniform over items 1..N or p itself ('popularity'). Items
  never seen in training get a floor of half a count in p, so every log p is finite.
  """
  if sampler not in NEGATIVE_SAMPLERS:
    raise ValueError(f"catalog.negative_sampler={sampler!r}; use one of {NEGATIVE_SAMPLERS}.")
  counts = jnp.asarray(item_counts, jnp.float32).at[0].set(0.0)
  counts = jnp.where(jnp.arange(counts.shape[0]) >= 1, jnp.maximum(counts, 0.5), 0.0)
  log_p = jnp.log(counts) - jnp.log(jnp.sum(counts))
  if sampler == "popularity":
    return log_p, log_p
  uniform = jnp.where(jnp.arange(counts.shape[0]) >= 1, -jnp.log(counts.shape[0] - 1.0),
                      -jnp.inf)
  return uniform, log_p


def sampled_cross_entropy(x, table, targets, in_batch, key, sampled: Sampled,
                          scale: float = 1.0) -> jax.Array:
  """Per-row sampled-softmax CE [R]: a consistent estimate of the full softmax CE.

  x [R, H]; targets [R] in 1..N; in_batch [C] item ids of the batch, negatives for every row
  (0 = none). The normaliser sum_j exp(s_j) is estimated as exp(s_target), computed exactly,
  plus an importance-sampled sum over the other items: the C in-batch items (drawn from the
  data distribution p) and M items drawn from q, each weighted by 1 / (C p_j + M q_j), its
  expected count among the candidates (the logQ correction of Bengio & Senecal and of Yi et
  al. 2019). A candidate equal to the row's own target (an "accidental hit") is left out, so
  as the candidates grow the estimate tends to the full softmax's normaliser.
  """
  drawn = jax.random.categorical(key, sampled.log_q, shape=(sampled.negatives,))
  candidates = jnp.concatenate([in_batch, drawn.astype(in_batch.dtype)])
  log_count = jnp.logaddexp(jnp.log(in_batch.shape[0]) + sampled.log_p,
                            jnp.log(sampled.negatives) + sampled.log_q)
  own = scale * jnp.einsum("rh,rh->r", x, catalog.lookup(table, targets).astype(x.dtype))
  others = scale * jnp.einsum("rh,ch->rc", x, catalog.lookup(table, candidates).astype(x.dtype))
  others = others.astype(jnp.float32) - log_count[candidates][None, :]
  left_out = (candidates[None, :] == targets[:, None]) | (candidates[None, :] == 0)
  others = jnp.where(left_out, -jnp.inf, others)
  own = own.astype(jnp.float32)
  return jax.nn.logsumexp(jnp.concatenate([own[:, None], others], axis=1), axis=1) - own
