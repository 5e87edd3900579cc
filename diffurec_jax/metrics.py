"""Full-ranking next-item metrics: hit@k, ndcg@k and mrr@k, named as in RecBole.

Each user's target is ranked against every item (no sampled negatives). On device a batch becomes
sums over its users (`evaluate_batch`, jit-friendly, padded rows weighted 0); on the host
`accumulate` adds the batches in float64 and `finalize` divides by the number of users, so results
are averages over users, never over batches.

Shapes: B = users in the batch, N = number of items; scores are [B, N + 1] with column 0 the padding
item, which is never ranked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

KS = (5, 10, 20)
# The metrics a run's results.json keeps (and a ledger row shows).
# What train.valid_metric may name.
VALID_METRICS = tuple(f"{name}@{k}" for name in ("hit", "ndcg", "mrr") for k in KS)
RESULT_KEYS = ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10")


def mask_items(scores: jax.Array, items: jax.Array, keep: jax.Array) -> jax.Array:
  """Sets the scores of the items in `items` to -inf, except `keep` (mask_history).

  scores: [B, N + 1]; items: [B, L] int32, 0 = padding (ignored); keep: [B] int32, the target,
  which is never masked even when it appears in the history. Returns scores: [B, N + 1].
  """
  chex.assert_rank([scores, items, keep], [2, 2, 1])
  chex.assert_equal_shape_prefix([scores, items, keep], 1)
  hide_item = (items != 0) & (items != keep[:, None])
  rows = jnp.arange(items.shape[0])[:, None]
  # Scatter-max of booleans: a repeated item is hidden if any of its copies is.
  hidden = jnp.zeros(scores.shape, dtype=bool).at[rows, items].max(hide_item)
  return jnp.where(hidden, jnp.asarray(-jnp.inf, scores.dtype), scores)


def pessimistic_rank(scores: jax.Array, targets: jax.Array) -> jax.Array:
  """1-based rank of each target among items 1..N, ties counted against the target.

  scores: [B, N + 1]; targets: [B] int32 in 1..N. Returns ranks: [B] int32 in 1..N, equal to
  1 + #{j >= 1, j != target: scores[j] >= scores[target]}. NaN never helps: a competitor scored NaN
  counts as beating the target, and a target scored NaN gets the worst rank N.
  """
  chex.assert_rank([scores, targets], [2, 1])
  chex.assert_equal_shape_prefix([scores, targets], 1)
  num_items = scores.shape[1] - 1
  target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)
  items = jnp.arange(scores.shape[1])[None, :]
  competitor = (items >= 1) & (items != targets[:, None])
  beats = (scores >= target_scores) | jnp.isnan(scores)
  ranks = 1 + jnp.sum(competitor & beats, axis=1, dtype=jnp.int32)
  return jnp.where(jnp.isnan(target_scores[:, 0]), num_items, ranks).astype(jnp.int32)


def metric_sums(ranks: jax.Array, weights: jax.Array,
                ks: Sequence[int] = KS) -> dict[str, jax.Array]:
  """Weighted sums over users of hit@k, ndcg@k and mrr@k for each k, plus 'count' = sum(weights).

  ranks: [B] int (1-based); weights: [B] float, 1 for real users and 0 for padded rows.
  ndcg@k = 1 / log2(rank + 1) and mrr@k = 1 / rank when rank <= k, else 0.
  """
  chex.assert_rank([ranks, weights], 1)
  chex.assert_equal_shape([ranks, weights])
  weights = weights.astype(jnp.float32)
  ranks_float = ranks.astype(jnp.float32)
  sums = {}
  for k in ks:
    hit = (ranks <= k).astype(jnp.float32) * weights
    sums[f"hit@{k}"] = jnp.sum(hit)
    sums[f"ndcg@{k}"] = jnp.sum(hit / jnp.log2(ranks_float + 1.0))
    sums[f"mrr@{k}"] = jnp.sum(hit / ranks_float)
  sums["count"] = jnp.sum(weights)
  return sums


def evaluate_batch(scores: jax.Array, targets: jax.Array, weights: jax.Array,
                   history: jax.Array | None = None,
                   ks: Sequence[int] = KS) -> tuple[dict[str, jax.Array], jax.Array]:
  """Masks the history (if given), ranks the targets and sums the metrics of one batch.

  scores: [B, N + 1]; targets: [B] int32; weights: [B] float; history: [B, L] int32 or None.
  Returns (sums, ranks [B] int32). Under jit, `ks` must be static (a closure or static_argnames).
  """
  if history is not None:
    scores = mask_items(scores, history, targets)
  ranks = pessimistic_rank(scores, targets)
  return metric_sums(ranks, weights, ks), ranks


def accumulate(total: Mapping[str, float], sums: Mapping[str, jax.Array]) -> dict[str, np.float64]:
  """Host side: adds one batch's sums into the running totals (float64). Start from {}."""
  if total and set(total) != set(sums):
    raise ValueError(f"Cannot add metric sums {sorted(sums)} to totals of {sorted(total)}.")
  return {name: np.float64(total.get(name, 0.0)) + np.float64(np.asarray(value))
          for name, value in sums.items()}


def finalize(total_sums: Mapping[str, float]) -> dict[str, float]:
  """Host side: each summed metric divided by the number of users; 'count' becomes int 'users'."""
  count = float(total_sums["count"])
  if count <= 0:
    raise ValueError(
        "No users were evaluated (total weight 0); check the split and the batch weights.")
  results = {name: float(value) / count for name, value in total_sums.items() if name != "count"}
  results["users"] = int(round(count))
  return results
