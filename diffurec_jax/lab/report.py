"""The experiment report: `write_report(workdir, variants, seeds, command)`.

Reads every run of the grid (results.json, metrics.jsonl, test_ranks.npz), computes the
paper's Table 3 and Table 4 layouts, the head/tail and history-length analyses and the answer
to "does the diffusion component matter?", draws the figures and writes report.json (every
number) and report.md (rendered from report.json only, see `report_markdown`).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib

import numpy as np

from diffurec_jax.lab import analysis
from diffurec_jax.lab import machine as machine_lib
from diffurec_jax.lab import plots
from diffurec_jax.training import workdir as workdir_lib

PUBLISHED_LABELS = {
    "diffurec": "DiffuRec (TOIS 2023)",
    "diffurecsys_v1": "DiffuRecSys V1 (paper)",
    "diffurecsys_v2": "DiffuRecSys V2 (paper)",
    "sasrec_paper_table5": "SASRec (DiffuRecSys Table 5)",
    "sasrec_ce_recbole": "SASRec-CE (RecBole, third party)",
}
ABLATION_MEANINGS = {
    "lambda0": "lambda = 0: the noised target never reaches the approximator",
    "steps1": "one reverse step at inference instead of the base run's chain",
}
TSNE_USERS = 500
TSNE_CLUSTERS = 5
# Variants every other one is t-tested against, where they are in the grid.
DEFAULT_BASELINES = ("diffurec", "sasrec")


PUBLISHED_PACKAGE_FILE = "reference/published_results.json"  # Ships inside diffurec_jax.


def published_source() -> str:
  """Where the published figures come from: $DIFFUREC_REFERENCE, else the packaged file."""
  return os.environ.get("DIFFUREC_REFERENCE") or f"diffurec_jax/{PUBLISHED_PACKAGE_FILE}"


def published_results(dataset: str) -> dict:
  """{label: {metric: value}} of published numbers for `dataset` (papers' tables, packaged)."""
  override = os.environ.get("DIFFUREC_REFERENCE")
  if override:
    text = pathlib.Path(override).read_text()
  else:
    text = importlib.resources.files("diffurec_jax").joinpath(
        PUBLISHED_PACKAGE_FILE).read_text()
  entries = json.loads(text).get(dataset, {})
  return {PUBLISHED_LABELS.get(name, name): values for name, values in entries.items()}


def read_run(path: str) -> dict:
  """results.json, metrics.jsonl records and test ranks of one finished run."""
  results = workdir_lib.read_json(path, "results.json")
  if results is None:
    raise workdir_lib.WorkdirError(f"{path} has no results.json; rerun the experiment to "
                                   "finish it.")
  records = workdir_lib.MetricsLog(path, False).read()
  with np.load(os.path.join(path, "test_ranks.npz")) as saved:
    ranks = {key: saved[key] for key in saved.files}
  return {"path": path, "results": results, "records": records, "ranks": ranks}


def _last_per_epoch(records, split):
  """{epoch: record} of one split; a resumed run that re-logged an epoch keeps the last."""
  return {record["epoch"]: record for record in records if record.get("split") == split}


def run_summary(run: dict, workdir: str, seed: int) -> dict:
  """Seed, best epoch and wall time (seconds from metrics.jsonl) of one run."""
  train = _last_per_epoch(run["records"], "train")
  evaluations = list(_last_per_epoch(run["records"], "valid").values())
  evaluations += [r for r in run["records"] if r.get("split") == "test"]
  train_seconds = float(sum(record["seconds"] for record in train.values()))
  eval_seconds = float(sum(record.get("seconds", 0.0) for record in evaluations))
  results = run["results"]
  return {"seed": seed, "workdir": os.path.relpath(run["path"], workdir),
          "best_epoch": results["best_epoch"], "epochs_run": results.get("epochs_run"),
          "mask_history": results["mask_history"],
          "sample_steps": None if results["variant"] == "sasrec" else results.get("sample_steps"),
          "reevaluated": "reevaluated_from" in results,
          "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
          "wall_seconds": round(train_seconds + eval_seconds, 3)}


def learning_curve(run: dict, seed: int) -> dict:
  train = _last_per_epoch(run["records"], "train")
  valid = _last_per_epoch(run["records"], "valid")
  return {"seed": seed, "epochs": sorted(train), "loss": [train[e]["loss"] for e in sorted(train)],
          "valid_epochs": sorted(valid),
          "valid_ndcg@10": [valid[e]["ndcg@10"] for e in sorted(valid)]}


def table3(runs: dict) -> dict:
  """Mean +- sample std over seeds of each test metric, with best epochs and per-seed values."""
  table = {}
  for name, per_seed in runs.items():
    values = {key: [run["results"]["test"][key] for run in per_seed]
              for key in analysis.RESULT_KEYS}
    table[name] = {"metrics": {key: analysis.seed_summary(values[key]) for key in values},
                   "per_seed": values, "seeds": len(per_seed),
                   "best_epochs": [run["results"]["best_epoch"] for run in per_seed]}
  return table


def table4(t3: dict, baselines=DEFAULT_BASELINES) -> list[dict]:
  """Paired t-tests of each variant against each baseline in the grid (default diffurec and
  sasrec); a pair already tested one way round is not repeated."""
  comparisons = []
  for baseline in baselines:
    if baseline not in t3:
      continue
    for name in t3:
      if name == baseline or any(c["variant"] == baseline and c["baseline"] == name
                                 for c in comparisons):
        continue
      ours, theirs = t3[name]["per_seed"], t3[baseline]["per_seed"]
      comparisons.append({
          "variant": name, "baseline": baseline,
          "per_metric": {key: analysis.paired_test(ours[key], theirs[key])
                         for key in analysis.RESULT_KEYS},
          "overall": analysis.overall_test(ours, theirs)})
  return comparisons


def _item_counts(config, cache: dict) -> np.ndarray:
  from diffurec_jax import data as data_lib
  key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
  if key not in cache:
    cache[key] = data_lib.prepare(config.data).item_counts()
  return cache[key]


def head_tail(runs: dict) -> dict:
  """Per variant: head/tail metrics (mean over seeds) from the per-user test ranks."""
  cache, table = {}, {}
  for name, per_seed in runs.items():
    counts = _item_counts(workdir_lib.load_config(per_seed[0]["path"]), cache)
    head = analysis.head_items(counts)
    per_run = [analysis.head_tail_metrics(run["ranks"]["ranks"], run["ranks"]["targets"], head)
               for run in per_seed]
    table[name] = {group: analysis.mean_over_runs([split[group] for split in per_run])
                   for group in ("head", "tail")}
    table[name].update(num_items=int(len(counts) - 1), num_head_items=int(head.sum()))
  return {"head_fraction": analysis.HEAD_FRACTION, "variants": table}


def length_groups(runs: dict) -> dict:
  """Per variant: metrics of five history-length percentile groups, mean over seeds."""
  table = {}
  for name, per_seed in runs.items():
    edges = analysis.length_edges(per_seed[0]["ranks"]["history_lengths"])
    per_run = [analysis.length_group_metrics(run["ranks"]["ranks"],
                                             run["ranks"]["history_lengths"], edges)
               for run in per_seed]
    groups = [dict(analysis.mean_over_runs([run[g] for run in per_run]),
                   lower=edges[g], upper=edges[g + 1]) for g in range(len(edges) - 1)]
    table[name] = {"edges": edges, "groups": groups}
  return {"groups": analysis.NUM_LENGTH_GROUPS, "variants": table}


def diffusion_answer(t3: dict) -> dict:
  """Ablations without the diffusion component vs their base variant on test NDCG@10."""
  comparisons = []
  for name in t3:
    parts = name.split("+")
    for ablation in ABLATION_MEANINGS:
      base = "+".join(part for part in parts if part != ablation)
      if ablation not in parts or base not in t3:
        continue
      test = analysis.paired_test(t3[name]["per_seed"]["ndcg@10"], t3[base]["per_seed"]["ndcg@10"])
      ours, theirs = (t3[n]["metrics"]["ndcg@10"]["mean"] for n in (name, base))
      comparisons.append({"variant": name, "base": base, "ablation": ablation,
                          "ndcg@10": ours, "base_ndcg@10": theirs, "diff": ours - theirs,
                          "t": test["t"], "p": test["p"], "note": test["note"],
                          "seeds": t3[name]["seeds"], "verdict": _verdict(test, ours - theirs)})
  return {"comparisons": comparisons, "sentence": _answer_sentence(comparisons)}


def _verdict(test: dict, diff: float) -> str:
  if test["note"].startswith("identical"):
    return "identical"
  if test["p"] is None:
    return "not testable"
  if test["p"] >= 0.05:
    return "no evidence of a difference"
  return "helps" if diff < 0 else "hurts"


def _answer_sentence(comparisons: list[dict]) -> str:
  if not comparisons:
    return ("Does the diffusion component matter? Not answered: the ablations lambda0 and "
            "steps1 (with their base variant) were not run; add e.g. `lambda0,steps1` to "
            "--variants.")
  clauses = []
  for c in comparisons:
    p = "n/a" if c["p"] is None else f"{c['p']:.3g}"
    outcome = {"not testable": f"not testable ({c['note']})",
               "identical": "identical in every seed",
               "no evidence of a difference": "no evidence of a difference",
               "helps": "significantly lower without it",
               "hurts": "significantly higher without it"}[c["verdict"]]
    clauses.append(f"{c['variant']} ({ABLATION_MEANINGS[c['ablation']]}) has test NDCG@10 "
                   f"{c['ndcg@10']:.4f} vs {c['base_ndcg@10']:.4f} for {c['base']} "
                   f"(difference {c['diff']:+.4f}; paired t-test over {c['seeds']} seed(s), "
                   f"p = {p}): {outcome}")
  verdicts = {c["verdict"] for c in comparisons}
  if "helps" in verdicts:
    answer = "Yes: removing it significantly lowers test NDCG@10."
  elif "hurts" in verdicts:
    answer = "No: removing it significantly raises test NDCG@10."
  elif verdicts == {"not testable"}:
    answer = "Undecided: no ablation could be tested."
  else:
    answer = ("No evidence that it does on this grid (few seeds detect only large "
              "differences).")
  missing = [a for a in ABLATION_MEANINGS if a not in {c["ablation"] for c in comparisons}]
  note = f" The {', '.join(missing)} ablation was not run." if missing else ""
  return f"Does the diffusion component matter? {answer} " + "; ".join(clauses) + "." + note


def tsne(runs: dict, workdir: str, path: str) -> dict | None:
  """The t-SNE of the first diffusion run's seed 0 (cached in figures/tsne.npz)."""
  name = next((n for n, per_seed in runs.items() if per_seed[0]["results"]["variant"] != "sasrec"
               and "reevaluated_from" not in per_seed[0]["results"]), None)
  if name is None:
    return None
  run_path = runs[name][0]["path"]
  cache = os.path.join(os.path.dirname(path), "tsne.npz")
  relative = os.path.relpath(run_path, workdir)
  if os.path.exists(cache):
    with np.load(cache) as saved:
      stored = {key: saved[key] for key in saved.files}
    if str(stored["run"]) != relative:
      stored = None
  else:
    stored = None
  if stored is None:
    users, x0 = plots.reconstruct_targets(run_path, TSNE_USERS)
    coords, labels = plots.tsne_clusters(x0, TSNE_CLUSTERS)
    stored = {"run": np.str_(relative), "users": users, "coords": coords, "labels": labels}
    np.savez(cache, **stored)
  title = f"t-SNE of reconstructed targets x0: {name} seed 0, {len(stored['users'])} test users"
  plots.tsne_plot(stored["coords"], stored["labels"], title, path)
  return {"variant": name, "run": relative, "users": int(len(stored["users"])),
          "clusters": int(len(np.unique(stored["labels"]))),
          "cluster_sizes": [int(n) for n in np.bincount(stored["labels"])]}


def build_report(workdir: str, variants: list[str], seeds: int, command: str,
                 baselines=DEFAULT_BASELINES) -> dict:
  """Every number of the report, from the finished runs of the grid; also draws the figures."""
  from diffurec_jax.lab import experiment
  runs = {name: [read_run(experiment.run_dir(workdir, name, seed)) for seed in range(seeds)]
          for name in variants}
  first = runs[variants[0]][0]["results"]
  summaries = {name: [run_summary(run, workdir, seed) for seed, run in enumerate(per_seed)]
               for name, per_seed in runs.items()}
  masked = sorted({s["mask_history"] for per_seed in summaries.values() for s in per_seed})
  t3 = table3(runs)
  report = {
      "command": command, "machine": machine_lib.describe(), "dataset": first["dataset"],
      "variants": variants, "seeds": seeds,
      "mask_history": masked[0] if len(masked) == 1 else "mixed",
      "runs": summaries, "table3": t3, "baselines": [b for b in baselines if b in t3],
      "table4": table4(t3, baselines),
      "published": published_results(first["dataset"]),
      "published_source": published_source(),
      "head_tail": head_tail(runs), "length_groups": length_groups(runs),
      "diffusion": diffusion_answer(t3),
  }
  directory = os.path.join(workdir, "figures")
  os.makedirs(directory, exist_ok=True)
  paths = {name: f"figures/{name}.png" for name in
           ("learning_curves", "head_tail", "length_groups", "tsne")}
  plots.learning_curves({name: [learning_curve(run, seed) for seed, run in enumerate(per_seed)
                                if run["results"].get("reevaluated_from") is None]
                         for name, per_seed in runs.items()},
                        os.path.join(workdir, paths["learning_curves"]))
  plots.head_tail_bars(report["head_tail"]["variants"], os.path.join(workdir, paths["head_tail"]))
  lengths = report["length_groups"]["variants"]
  labels = analysis.group_labels(lengths[variants[0]]["edges"])
  plots.length_group_bars({name: table["groups"] for name, table in lengths.items()}, labels,
                          os.path.join(workdir, paths["length_groups"]))
  report["tsne"] = tsne(runs, workdir, os.path.join(workdir, paths["tsne"]))
  if report["tsne"] is None:
    del paths["tsne"]
  report["figures"] = paths
  return report


def write_report(workdir: str, variants: list[str], seeds: int, *, command: str,
                 baselines=DEFAULT_BASELINES) -> dict:
  """Builds the report and writes report.json and report.md into `workdir`.

  `baselines`: the variants every other one is t-tested against (those in the grid).
  """
  from diffurec_jax.lab import report_markdown
  report = build_report(workdir, variants, seeds, command, tuple(baselines))
  workdir_lib.write_json(workdir, "report.json", report)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report_markdown.render(report))
  print(f"report: {os.path.join(workdir, 'report.md')}")
  return report
