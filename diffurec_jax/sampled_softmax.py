"""A sampled softmax for training on large catalogs (`catalog.loss=sampled`): the batch's own
targets plus M negatives drawn uniformly or by popularity, logQ-corrected, so the loss is a
consistent estimate of the full softmax cross-entropy (catalog.cross_entropy). Negatives are
drawn through an alias table (Walker 1977; Vose 1991): O(1) work per draw whatever N is.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffurec_jax import catalog

LOSSES = ("full", "sampled")
NEGATIVE_SAMPLERS = ("uniform", "popularity")


class Sampled(NamedTuple):
  """A sampled softmax: M negatives per step from q, plus the batch's own targets (drawn from
  the data distribution p); q and p as log probabilities over the items [N+1] (-inf at 0), q
  also as its alias table (`make`)."""
  negatives: int  # M, shared by every row of a step.
  log_q: jax.Array  # [N+1] the negative sampler.
  log_p: jax.Array  # [N+1] the training items' frequency (in-batch candidates).
  keep: jax.Array  # [N+1] float32: the probability that a draw landing on slot j keeps j...
  alias: jax.Array  # [N+1] int32: ...the item it takes otherwise.


def alias_table(q) -> tuple[np.ndarray, np.ndarray]:
  """(keep [K] float32, alias [K] int32) of a distribution q [K] (Vose's method, float64).

  Drawing slot j uniformly, then j with probability keep[j] and alias[j] otherwise, draws
  item i with probability q_i (up to keep's float32 rounding). Items with q_i = 0 are never
  drawn. q need not be normalised; it must be finite, >= 0, and not all 0.
  """
  q = np.asarray(q, np.float64)
  if q.ndim != 1 or not np.all(np.isfinite(q)) or np.any(q < 0) or q.sum() <= 0:
    raise ValueError("alias_table needs a 1-D array of finite weights >= 0, not all 0.")
  size = q.shape[0]
  scaled = q * (size / q.sum())
  keep = np.ones(size)
  alias = np.arange(size, dtype=np.int64)
  small = [j for j in range(size) if scaled[j] < 1.0]
  large = [j for j in range(size) if scaled[j] >= 1.0]
  while small and large:
    low, high = small.pop(), large[-1]
    keep[low], alias[low] = scaled[low], high
    scaled[high] -= 1.0 - scaled[low]
    if scaled[high] < 1.0:
      small.append(large.pop())
  # What remains is 1 up to rounding: kept whole (a zero-weight slot always has a partner).
  return keep.astype(np.float32), alias.astype(np.int32)


def make(negatives: int, log_q, log_p) -> Sampled:
  """The Sampled of M negatives from q = exp(log_q), in-batch items from p = exp(log_p)."""
  keep, alias = alias_table(np.exp(np.asarray(log_q, np.float64)))
  return Sampled(negatives, jnp.asarray(log_q), jnp.asarray(log_p), jnp.asarray(keep),
                 jnp.asarray(alias))


def draw_negatives(key, sampled: Sampled) -> jax.Array:
  """M item ids [M] int32 drawn i.i.d. from q with replacement, through the alias table."""
  slot_key, coin_key = jax.random.split(key)
  size = sampled.keep.shape[0]
  slots = jax.random.randint(slot_key, (sampled.negatives,), 0, size, dtype=jnp.int32)
  coins = jax.random.uniform(coin_key, (sampled.negatives,))
  return jnp.where(coins < sampled.keep[slots], slots, sampled.alias[slots])


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
  drawn = draw_negatives(key, sampled)
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
