"""The verdict paragraph of a dataset in docs/results.md: do V1/V2 beat DiffuRec, does anything
beat the tuned SASRec-CE, written from the report's rows and its paired tests over users."""

from __future__ import annotations

VERDICT_VARIANTS = (("v1", "V1 (cross-attention)"), ("v2", "V2 (offset noise)"))
SIGNIFICANT = 0.05  # Two-sided p of the paired test over users.


def _compared(name: str, baseline: str, rows: dict, tests: list[dict]) -> str:
  """'4.26% vs 4.08% NDCG@10, +0.18 points (paired t over users p = 0.032)': `name` against
  `baseline` (the p-value only where the paired test exists)."""
  run, base = rows[name], rows[baseline]
  text = (f"{100 * run['ndcg@10'][0]:.2f}% vs {100 * base['ndcg@10'][0]:.2f}% NDCG@10, "
          f"{100 * (run['ndcg@10'][0] - base['ndcg@10'][0]):+.2f} points")
  test = next((t for t in tests if t["name"] == name and t["baseline"] == baseline), None)
  if test is not None and test["p"] is not None:
    if (test["seeds"], test["baseline_seeds"]) == (run["seeds"], base["seeds"]):
      text += f" (paired t over users p = {test['p']:.2g})"
    else:  # Seeds without ranks: the tested difference is not the table's.
      text += (f" (paired t over users of the {test['seeds']} / {test['baseline_seeds']} seeds "
               f"with ranks: {100 * test['mean_diff']:+.2f} points, p = {test['p']:.2g})")
  return text


def _better(name: str, baseline: str, rows: dict, tests: list[dict]) -> str:
  """NDCG@10 of `name` against `baseline` by the paired test over users: 'better', 'worse' or
  'not different'; 'higher, untested' / 'lower, untested' where the ledger has no ranks."""
  test = next((t for t in tests if t["name"] == name and t["baseline"] == baseline), None)
  difference = rows[name]["ndcg@10"][0] - rows[baseline]["ndcg@10"][0]
  if test is None or test["p"] is None:
    return "higher, untested" if difference > 0 else "lower, untested"
  if test["p"] >= SIGNIFICANT:
    return "not different"
  return "better" if difference > 0 else "worse"


MAIN_ROWS = ("diffurec", "v1", "v2", "sasrec")  # The campaign's 3-seed rows.


def verdict(title: str, summary: list[dict], tests: list[dict]) -> list[str]:
  """The dataset's answer to the papers' claims, written from the table's rows and tests."""
  rows = {row["name"]: row for row in summary}
  if "diffurec" not in rows:
    return []
  sentences = []
  claims = []
  for name, label in VERDICT_VARIANTS:
    if name not in rows:
      continue
    paper, paper_base = rows[name]["paper"], rows["diffurec"]["paper"]
    claim = ""
    if paper and paper_base:
      claim = (f"; the paper reports {100 * paper['ndcg@10']:.2f}% against its DiffuRec's "
               f"{100 * paper_base['ndcg@10']:.2f}%")
    outcome = _better(name, "diffurec", rows, tests)
    claims.append(outcome == "better")
    sentences.append(f"{label} against DiffuRec: {_compared(name, 'diffurec', rows, tests)}, "
                     f"{outcome}{claim}.")
  if claims:
    sentences.append("The DiffuRecSys claim that V1/V2 beat DiffuRec "
                     + ("holds here." if all(claims) else
                        "holds here for " + " and ".join(
                            n for (n, _), c in zip(VERDICT_VARIANTS, claims) if c) + " only."
                        if any(claims) else "does not hold here."))
  if "sasrec" in rows:
    outcomes = {name: _better(name, "sasrec", rows, tests) for name in MAIN_ROWS[:3]
                if name in rows}
    winners = [name for name, outcome in outcomes.items() if outcome == "better"]
    untested = [name for name, outcome in outcomes.items() if outcome == "higher, untested"]
    sentences.append(
        f"DiffuRec against the tuned SASRec-CE: {_compared('diffurec', 'sasrec', rows, tests)}, "
        f"{outcomes['diffurec']}. "
        + (f"Better than SASRec-CE: {', '.join(winners)}." if winners else
           f"Above SASRec-CE's mean but not tested (SASRec's runs have no per-user ranks): "
           f"{', '.join(untested)}." if untested else
           "No diffusion variant here beats the tuned SASRec-CE."))
  seeds = {name: rows[name]["seeds"] for name in MAIN_ROWS if name in rows}
  if min(seeds.values()) < 3:
    sentences.append("Provisional: " + ", ".join(f"{n} {k} seed{'s' if k > 1 else ''}"
                                                 for n, k in seeds.items() if k < 3)
                     + " of the 3 the campaign plans.")
  return [f"**Verdict on {title}** (written by the report from the rows above; NDCG@10, "
          f"differences tested at p < {SIGNIFICANT}): " + " ".join(sentences), ""]


def ensemble_verdict(runs: list[tuple[str, int, list[dict]]]) -> list[str]:
  """The answer on Algorithm 3 from the ensemble table: runs [(label, users, rows)], rows as
  user_tests.ensemble_rows. Nothing when no row was tested against one chain."""
  tested = [(label, users, row) for label, users, rows in runs for row in rows
            if row["test"] is not None]
  if not tested:
    return []
  significant = [(label, row) for label, _, row in tested
                 if row["test"]["p"] is not None and row["test"]["p"] < SIGNIFICANT]
  label, _, largest = max(tested, key=lambda item: abs(item[2]["delta"]))
  if significant:
    first = ("Averaging S chains changed NDCG@10 against one chain at p < "
             f"{SIGNIFICANT} for " + ", ".join(
                 f"{name} S = {row['S']} ({100 * row['delta']:+.2f} points)"
                 for name, row in significant) + ".")
  else:
    first = (f"Averaging S chains changed no run's NDCG@10 against one chain at p < "
             f"{SIGNIFICANT}; the largest difference is {100 * largest['delta']:+.2f} points "
             f"({label}, S = {largest['S']}).")
  _, users, most = max(tested, key=lambda item: item[2]["changed"] / item[1])
  share = most["changed"] / users
  second = (f"At most {most['changed']} of {users} users ({100 * share:.3g}%) saw any target "
            "rank within the top 20 move")
  second += (": the chains of these checkpoints rank almost exactly as one chain does, so "
             "averaging S chains costs S times the approximator passes for no measurable gain "
             "here." if share < 0.01 else ".")
  return [f"**Verdict on seed ensembles** (written by the report from the rows above): "
          f"{first} {second}", ""]
