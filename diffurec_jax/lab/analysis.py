"""The numbers of an experiment report, as small pure functions of numpy arrays.

Seed summaries (mean, sample std), paired t-tests (per metric over seeds, and overall over all
(metric, seed) pairs as the DiffuRecSys paper's Table 4), metrics recomputed from per-user test
ranks, the head/tail split of items by training frequency and the five history-length groups.
A statistic that cannot be computed is None (shown as "n/a") with the reason beside it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from diffurec_jax import metrics

RESULT_KEYS = metrics.RESULT_KEYS
GROUP_KEYS = ("hit@10", "ndcg@10")
HEAD_FRACTION = 0.2  # The most frequent 20% of items are "head" (DiffuRecSys Section 6.5).
NUM_LENGTH_GROUPS = 5  # Quintiles of history length (DiffuRecSys Section 6.5).


def finite_or_none(value) -> float | None:
  """A float for JSON, or None where the value is NaN or infinite."""
  value = float(value)
  return value if math.isfinite(value) else None


def seed_summary(values) -> dict:
  """{'mean', 'std' (ddof=1; None with one seed), 'seeds'} of one metric over seeds."""
  values = np.asarray(values, dtype=np.float64)
  assert values.ndim == 1 and len(values) >= 1, values.shape
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return {"mean": float(np.mean(values)), "std": std, "seeds": len(values)}


def paired_test(values, baseline) -> dict:
  """Paired t-test of `values` against `baseline` (same length, paired by position).

  Returns {'t', 'p', 'pairs', 'mean_diff', 'note'}; t and p are None (with a note) when there
  are fewer than 2 pairs or the differences are all equal (the t statistic is undefined).
  """
  values = np.asarray(values, dtype=np.float64)
  baseline = np.asarray(baseline, dtype=np.float64)
  assert values.shape == baseline.shape and values.ndim == 1, (values.shape, baseline.shape)
  differences = values - baseline
  result = {"t": None, "p": None, "pairs": len(values),
            "mean_diff": float(np.mean(differences)) if len(values) else None, "note": ""}
  if len(values) < 2:
    result["note"] = "fewer than 2 pairs (run more seeds)"
  elif np.all(differences == 0):
    result["note"] = "identical: equal values in every pair (no difference at all)"
  elif np.all(differences == differences[0]):
    result["note"] = "zero variance: the same nonzero difference in every pair"
  else:
    with warnings.catch_warnings():  # Nearly equal pairs warn of precision loss; t stays valid.
      warnings.simplefilter("ignore", RuntimeWarning)
      test = stats.ttest_rel(values, baseline)
    result.update(t=finite_or_none(test.statistic), p=finite_or_none(test.pvalue))
  return result


def overall_test(values: dict, baseline: dict, keys=RESULT_KEYS) -> dict:
  """One paired t-test over all (metric, seed) pairs, as the paper's Table 4.

  values, baseline: {metric: [per-seed values]}. Adds the average relative difference in
  percent (pairs with a zero baseline left out) and the average absolute difference in
  percentage points (what the paper's "Avg. Diff." column matches).
  """
  ours = np.concatenate([np.asarray(values[key], np.float64) for key in keys])
  theirs = np.concatenate([np.asarray(baseline[key], np.float64) for key in keys])
  result = paired_test(ours, theirs)
  nonzero = theirs != 0
  relative = (ours[nonzero] - theirs[nonzero]) / theirs[nonzero] * 100.0
  result["avg_relative_diff_percent"] = float(np.mean(relative)) if relative.size else None
  result["relative_pairs"] = int(nonzero.sum())
  result["avg_diff_points"] = float(np.mean(ours - theirs) * 100.0)
  return result


def metrics_from_ranks(ranks, keys=GROUP_KEYS) -> dict:
  """Mean hit@k / ndcg@k / mrr@k of 1-based ranks; {'users': 0, key: None} if empty.

  hit@k = [rank <= k], ndcg@k = 1 / log2(rank + 1) if rank <= k, mrr@k = 1 / rank if rank <= k.
  """
  ranks = np.asarray(ranks, dtype=np.float64)
  result = {"users": int(ranks.size)}
  for key in keys:
    name, k = key.split("@")
    hit = ranks <= int(k)
    if name == "hit":
      per_user = hit.astype(np.float64)
    elif name == "ndcg":
      per_user = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    else:
      assert name == "mrr", key
      per_user = np.where(hit, 1.0 / ranks, 0.0)
    result[key] = float(per_user.mean()) if ranks.size else None
  return result


def head_items(item_counts, fraction: float = HEAD_FRACTION) -> np.ndarray:
  """[N+1] bool: the ceil(fraction * N) most frequent items (ties: lower index first).

  item_counts: [N+1] training interactions per item, index 0 = padding (never head).
  """
  counts = np.asarray(item_counts)
  num_items = len(counts) - 1
  num_head = int(math.ceil(fraction * num_items)) if num_items else 0
  order = np.argsort(-counts[1:], kind="stable") + 1
  head = np.zeros(len(counts), dtype=bool)
  head[order[:num_head]] = True
  return head


def head_tail_metrics(ranks, targets, head, keys=GROUP_KEYS) -> dict:
  """{'head': metrics, 'tail': metrics} of the users whose test item is head / tail."""
  is_head = np.asarray(head)[np.asarray(targets)]
  ranks = np.asarray(ranks)
  return {"head": metrics_from_ranks(ranks[is_head], keys),
          "tail": metrics_from_ranks(ranks[~is_head], keys)}


def length_edges(history_lengths, groups: int = NUM_LENGTH_GROUPS) -> list[float]:
  """groups + 1 percentile edges (0, 20, ..., 100 for five groups) of the history lengths."""
  return [float(edge) for edge in
          np.percentile(np.asarray(history_lengths, np.float64), np.linspace(0, 100, groups + 1))]


def length_group_index(history_lengths, edges) -> np.ndarray:
  """Group g holds lengths in [edges[g], edges[g+1]) (the last group also its upper edge).

  Repeated edges (many equal lengths) leave some groups empty rather than splitting ties.
  """
  inner = np.asarray(edges[1:-1], dtype=np.float64)
  index = np.searchsorted(inner, np.asarray(history_lengths, np.float64), side="right")
  return np.minimum(index, len(edges) - 2)


def group_labels(edges) -> list[str]:
  """'[4, 5)', ..., '[10, 50]': the length range of each group."""
  last = len(edges) - 2
  return [f"[{edges[g]:g}, {edges[g + 1]:g}{']' if g == last else ')'}" for g in range(last + 1)]


def length_group_metrics(ranks, history_lengths, edges, keys=GROUP_KEYS) -> list[dict]:
  """Metrics per length group: [{'lower', 'upper', 'users', key...}] for each group."""
  group = length_group_index(history_lengths, edges)
  ranks = np.asarray(ranks)
  return [{"lower": edges[g], "upper": edges[g + 1], **metrics_from_ranks(ranks[group == g], keys)}
          for g in range(len(edges) - 1)]


def mean_over_runs(per_run: list[dict], keys=GROUP_KEYS) -> dict:
  """Mean over runs of metric dicts (None entries left out; None if all are None)."""
  result = {"users": per_run[0]["users"]}
  for key in keys:
    values = [run[key] for run in per_run if run[key] is not None]
    result[key] = float(np.mean(values)) if values else None
  return result
