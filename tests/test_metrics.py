"""Tests of the full-ranking metrics on hand-computed tables."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax import metrics

NAN, INF = float("nan"), float("inf")
# Shared compiled evaluation, as the evaluator uses it.
evaluate_jit = jax.jit(metrics.evaluate_batch, static_argnames="ks")

# (scores over [padding, item 1..5], target, expected pessimistic rank)
RANK_TABLE = [
    ([9.0, 0.5, 0.5, 0.5, 0.1, 0.2], 1, 3),  # tied with two; padding (top) ignored
    ([9.0, 0.1, 0.2, 0.3, 0.4, 0.9], 5, 1),
    ([9.0, 0.1, 0.2, 0.3, 0.4, 0.9], 1, 5),  # worst = N
    ([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 3, 5),  # all tied
    ([-INF, 0.2, -INF, -INF, 0.1, 0.3], 4, 3),  # masked items below the target
    ([0.0, 0.3, NAN, 0.1, 0.1, 0.1], 1, 2),  # a NaN competitor counts against the target
    ([0.0, NAN, 0.1, 0.2, 0.3, 0.4], 1, 5),  # a NaN target gets the worst rank
]

# rank -> (hit, ndcg, mrr) at k = 5, 10, 20
METRIC_TABLE = {
    1: [(1, 1, 1)] * 3,
    3: [(1, 0.5, 1 / 3)] * 3,  # 1 / log2(4)
    7: [(0, 0, 0), (1, 1 / 3, 1 / 7), (1, 1 / 3, 1 / 7)],  # 1 / log2(8)
    15: [(0, 0, 0), (0, 0, 0), (1, 0.25, 1 / 15)],  # 1 / log2(16)
    25: [(0, 0, 0)] * 3,
}


def expected_sums(ranks, weights):
  sums = {}
  for i, k in enumerate(metrics.KS):
    for j, name in enumerate(("hit", "ndcg", "mrr")):
      sums[f"{name}@{k}"] = sum(w * METRIC_TABLE[r][i][j] for r, w in zip(ranks, weights))
  sums["count"] = sum(weights)
  return sums


def assert_sums(actual, expected):
  assert set(actual) == set(expected)
  for name, value in expected.items():
    chex.assert_shape(actual[name], ())
    assert float(actual[name]) == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_pessimistic_rank_table():
  scores = jnp.array([row[0] for row in RANK_TABLE])
  targets = jnp.array([row[1] for row in RANK_TABLE], jnp.int32)
  ranks = metrics.pessimistic_rank(scores, targets)
  chex.assert_shape(ranks, (len(RANK_TABLE),))
  chex.assert_type(ranks, jnp.int32)
  np.testing.assert_array_equal(ranks, [row[2] for row in RANK_TABLE])


@pytest.mark.parametrize("rank", sorted(METRIC_TABLE))
def test_metric_sums_single_user(rank):
  sums = metrics.metric_sums(jnp.array([rank]), jnp.array([1.0]))
  assert_sums(sums, expected_sums([rank], [1.0]))


def test_metric_sums_excludes_zero_weight_rows():
  ranks, weights = [1, 3, 7, 15, 25, 1, 1], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
  sums = metrics.metric_sums(jnp.array(ranks), jnp.array(weights))
  assert_sums(sums, expected_sums(ranks[:5], weights[:5]))
  assert float(sums["count"]) == 5.0


def test_k_larger_than_the_number_of_items():
  # Three items: every rank is at most 3, so every k in (5, 10, 20) hits.
  scores = jnp.array([[5.0, 0.3, 0.2, 0.1], [5.0, 0.3, 0.2, 0.1]])
  sums, ranks = evaluate_jit(scores, jnp.array([3, 2]), jnp.ones(2))
  np.testing.assert_array_equal(ranks, [3, 2])
  for k in metrics.KS:
    assert float(sums[f"hit@{k}"]) == 2.0
    assert float(sums[f"ndcg@{k}"]) == pytest.approx(1 / math.log2(4) + 1 / math.log2(3))
    assert float(sums[f"mrr@{k}"]) == pytest.approx(1 / 3 + 1 / 2)


def test_mask_items_never_hides_the_target():
  scores = jnp.array([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                      [0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
  history = jnp.array([[2, 3, 0, 3], [1, 1, 0, 0]], jnp.int32)
  targets = jnp.array([3, 5], jnp.int32)
  masked = metrics.mask_items(scores, history, targets)
  chex.assert_shape(masked, (2, 6))
  expected = np.where([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], -INF, scores)
  np.testing.assert_array_equal(masked, expected)
  _, unmasked_ranks = evaluate_jit(scores, targets, jnp.ones(2))
  _, masked_ranks = evaluate_jit(scores, targets, jnp.ones(2), history)
  np.testing.assert_array_equal(unmasked_ranks, [3, 5])
  np.testing.assert_array_equal(masked_ranks, [2, 4])


def test_averages_are_over_users_not_batches():
  total = {}
  total = metrics.accumulate(total, metrics.metric_sums(jnp.array([1, 1]), jnp.ones(2)))
  total = metrics.accumulate(
      total, metrics.metric_sums(jnp.array([30, 30, 30, 1]), jnp.array([1.0, 1.0, 1.0, 0.0])))
  assert all(isinstance(value, np.float64) for value in total.values())
  results = metrics.finalize(total)
  assert results["users"] == 5 and isinstance(results["users"], int)
  for k in metrics.KS:
    assert results[f"hit@{k}"] == pytest.approx(2 / 5)  # the mean of batch means would be 1/2
    assert results[f"ndcg@{k}"] == pytest.approx(2 / 5)
    assert isinstance(results[f"mrr@{k}"], float)
  assert "count" not in results


def test_host_side_errors():
  with pytest.raises(ValueError, match="No users"):
    metrics.finalize({"hit@5": 0.0, "count": 0.0})
  with pytest.raises(ValueError, match="Cannot add"):
    metrics.accumulate({"hit@5": 1.0, "count": 1.0}, {"count": 1.0})


@pytest.mark.slow
def test_jit_agrees_with_eager():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.standard_normal((6, 31)), jnp.float32)
  targets = jnp.asarray(rng.integers(1, 31, 6), jnp.int32)
  history = jnp.asarray(rng.integers(0, 31, (6, 5)), jnp.int32)
  weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
  jit_sums, jit_ranks = evaluate_jit(scores, targets, weights, history)
  sums, ranks = metrics.evaluate_batch(scores, targets, weights, history)
  np.testing.assert_array_equal(jit_ranks, ranks)
  assert set(jit_sums) == set(sums)
  for name in sums:
    assert float(jit_sums[name]) == pytest.approx(float(sums[name]), rel=1e-6), name
  # Custom ks are static: their names become the keys.
  custom, _ = evaluate_jit(scores, targets, weights, history, ks=(1, 3))
  assert set(custom) == {"hit@1", "ndcg@1", "mrr@1", "hit@3", "ndcg@3", "mrr@3", "count"}
