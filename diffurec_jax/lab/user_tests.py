"""Paired t-tests over test users of per-user NDCG@10, from the ranks the ledger keeps: each
run against the baselines (diffurec, sasrec), and each seed-ensemble size against one chain.
"""

from __future__ import annotations

import os

import numpy as np

from diffurec_jax.lab import ledger as ledger_lib
from diffurec_jax.lab import report as report_lib


def per_user_ndcg10(ranks) -> np.ndarray:
  """NDCG@10 of each user from 1-based ranks: 1 / log2(rank + 1) within the top 10, else 0."""
  ranks = np.asarray(ranks, dtype=np.float64)
  return np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)


def user_tests(root: str, dataset: str, entries) -> list[dict]:
  """Paired t-tests over test users of NDCG@10 (each user's mean over the seeds whose ranks
  the ledger holds): every run against each baseline of report.DEFAULT_BASELINES. Rows whose users differ
  (another data config) are skipped."""
  from diffurec_jax.lab import analysis  # scipy and jax: only when a report is built.
  per_run = {}
  for entry in entries:
    if entry.dataset != dataset or entry.kind != "run":
      continue
    saved = ledger_lib.read_ranks(os.path.join(root, dataset, entry.name, f"seed{entry.seed}"))
    if saved is not None:
      per_run.setdefault(entry.name, []).append(saved)
  means = {}
  for name, runs in per_run.items():
    if all(np.array_equal(run["users"], runs[0]["users"]) for run in runs):
      means[name] = (runs[0]["users"], np.mean([per_user_ndcg10(run["ranks"]) for run in runs],
                                               axis=0), len(runs))
  tests = []
  for baseline in report_lib.DEFAULT_BASELINES:
    if baseline not in means:
      continue
    base_users, base_values, base_seeds = means[baseline]
    for name, (users, values, seeds) in sorted(means.items()):
      if name == baseline or not np.array_equal(users, base_users):
        continue
      test = analysis.paired_test(values, base_values)
      tests.append({"name": name, "baseline": baseline, "seeds": seeds,
                    "baseline_seeds": base_seeds, **test})
  return tests


def user_tests_section(tests: list[dict]) -> list[str]:
  if not tests:
    return []
  lines = ["Paired t-tests over test users (scipy.stats.ttest_rel, two-sided) of per-user "
           "NDCG@10, each user's value averaged over the seeds whose ranks the ledger holds "
           "(runs added before 2026-12-03 have none):", "",
           "| run | vs | seeds (run / baseline) | users | NDCG@10 difference (points) | t | p |",
           "|---|---|---|---|---|---|---|"]
  for test in tests:
    t = "-" if test["t"] is None else f"{test['t']:.2f}"
    p = "-" if test["p"] is None else f"{test['p']:.2g}"
    lines.append(f"| {test['name']} | {test['baseline']} | {test['seeds']} / "
                 f"{test['baseline_seeds']} | {test['pairs']} | "
                 f"{100 * test['mean_diff']:+.2f} | {t} | {p} |")
  return lines + [""]


def ensemble_rows(root: str, entry) -> list[dict]:
  """The rows of `entry`'s seed ensembles (ensemble.json), each with 'delta' (NDCG@10 minus
  S = 1's, None without an S = 1 row), 'test' (the paired t-test over users of per-user
  NDCG@10 against S = 1) and 'changed' (users whose rank differs from S = 1's, ranks past 20
  counted as one; both None without the ranks file or an S = 1 row)."""
  from diffurec_jax.lab import analysis
  ensemble = entry.ensemble
  saved = ledger_lib.read_ensemble_ranks(
      os.path.join(root, entry.dataset, entry.name, f"seed{entry.seed}"))
  ranks = dict(zip(saved["chains"].tolist(), saved["ranks"])) if saved is not None else {}
  single = next((row for row in ensemble["rows"] if row["S"] == 1), None)
  rows = []
  for row in ensemble["rows"]:
    delta = test = changed = None
    if single is not None and row is not single:
      delta = row["metrics"]["ndcg@10"] - single["metrics"]["ndcg@10"]
      if row["S"] in ranks and 1 in ranks:
        test = analysis.paired_test(per_user_ndcg10(ranks[row["S"]]), per_user_ndcg10(ranks[1]))
        capped = [np.minimum(ranks[s], ledger_lib.RANK_CAP) for s in (row["S"], 1)]
        changed = int(np.sum(capped[0] != capped[1]))
    rows.append({**row, "delta": delta, "test": test, "changed": changed})
  return rows


def p_text(test: dict | None) -> str:
  """The p-value; 'n/a (identical)' or 'n/a (zero variance)' where t is undefined."""
  if test is None:
    return "-"
  if test["p"] is None:
    return f"n/a ({test['note'].split(':')[0]})" if test["note"] else "-"
  return f"{test['p']:.2g}"
