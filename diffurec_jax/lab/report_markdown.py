"""report.md, rendered from the report dict alone (so report.json holds every number shown)."""

from __future__ import annotations

import collections

from diffurec_jax.lab import analysis


def number(value, digits: int = 4) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def p_value(value) -> str:
  if value is None:
    return "n/a"
  return f"{value:.4f}" if value >= 1e-4 else f"{value:.2e}"


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def masked(report: dict) -> str:
  value = report["mask_history"]
  return "mixed (see the runs table)" if value == "mixed" else ("yes" if value else "no")


def caption(report: dict) -> str:
  return (f"Test split, full ranking over all items; {report['seeds']} seed(s) per variant; "
          f"history items masked from the ranking: {masked(report)}.")


def header_section(report: dict) -> str:
  machine = report["machine"]
  devices = ", ".join(f"{count} x {kind}"
                      for kind, count in collections.Counter(machine["devices"]).items())
  return "\n".join([
      f"# Experiment report: {report['dataset']}", "",
      "Produced by:", "", "```", report["command"], "```", "",
      f"Machine: {machine['os']} ({machine['processor']}, {machine['cpu_count']} CPUs); "
      f"JAX {machine['jax']} on {machine['backend']} ({devices}).", "",
      f"Variants: {', '.join(report['variants'])}. Seeds: {report['seeds']}. "
      f"History items masked from the ranking: {masked(report)}.", ""])


def runs_section(report: dict) -> str:
  rows = []
  for name, runs in report["runs"].items():
    for run in runs:
      epochs = "re-evaluated" if run["reevaluated"] else run["epochs_run"]
      steps = "-" if run["sample_steps"] is None else run["sample_steps"]
      rows.append([name, run["seed"], run["best_epoch"], epochs, steps,
                   number(run["train_seconds"], 1), number(run["eval_seconds"], 1),
                   number(run["wall_seconds"], 1), f"`{run['workdir']}`"])
  return "\n".join([
      "## Runs and wall time", "",
      "Seconds from each run's metrics.jsonl (training epochs; validation and test "
      "evaluations). Re-evaluated runs (inference ablations) reuse the trained checkpoint of "
      f"their base run. {report['seeds']} seed(s); history items masked from the ranking: "
      f"{masked(report)}.", "",
      table(["variant", "seed", "best epoch", "epochs run", "reverse steps", "train s", "eval s",
             "total s", "workdir"], rows), ""])


def table3_section(report: dict) -> str:
  t3, published = report["table3"], report["published"]
  header = ["metric"] + list(t3) + [f"{label} †" for label in published]
  rows = []
  for key in analysis.RESULT_KEYS:
    cells = []
    for name in t3:
      summary = t3[name]["metrics"][key]
      std = "" if summary["std"] is None else f" ± {summary['std']:.4f}"
      cells.append(f"{summary['mean']:.4f}{std}")
    cells += [number(values.get(key)) for values in published.values()]
    rows.append([key] + cells)
  rows.append(["seeds"] + [t3[name]["seeds"] for name in t3] + [""] * len(published))
  rows.append(["best epochs"] + [", ".join(map(str, t3[name]["best_epochs"])) for name in t3]
              + [""] * len(published))
  note = ("† published, not measured here (source: "
          f"`{report['published_source']}`); shown for reference only." if published else
          f"No published reference numbers for {report['dataset']} were found.")
  return "\n".join([
      "## Table 3: test metrics, mean ± std over seeds", "",
      caption(report) + " Standard deviation is the sample std (ddof=1); none with one seed.",
      "", table(header, rows), "", note, ""])


def table4_section(report: dict) -> str:
  comparisons = report["table4"]
  if not comparisons:
    return "## Table 4: paired t-tests\n\nNo baseline variant is in the grid.\n"
  overall_rows, metric_rows, notes = [], [], set()
  for c in comparisons:
    o = c["overall"]
    if o["note"]:
      notes.add(o["note"])
    overall_rows.append([c["variant"], c["baseline"], number(o["t"]), p_value(o["p"]),
                         o["pairs"], number(o["avg_relative_diff_percent"], 2),
                         number(o["avg_diff_points"], 3)])
    cells = []
    for key in analysis.RESULT_KEYS:
      test = c["per_metric"][key]
      if test["note"]:
        notes.add(test["note"])
      cells.append("n/a" if test["t"] is None else f"t={test['t']:.3f}, p={p_value(test['p'])}")
    metric_rows.append([c["variant"], c["baseline"]] + cells)
  reasons = "".join(f"\n- n/a: {note}" for note in sorted(notes))
  return "\n".join([
      "## Table 4: paired t-tests against " + " and ".join(report["baselines"]), "",
      caption(report) + " Overall: one paired t-test (scipy.stats.ttest_rel) over all "
      "(metric, seed) pairs of the 7 metrics, as the DiffuRecSys paper's Table 4; average "
      "relative difference in percent of the baseline, and the average absolute difference in "
      "percentage points (the paper's 'Avg. Diff.' column matches the latter).", "",
      table(["variant", "vs", "t", "p", "pairs", "avg rel. diff (%)", "avg diff (points)"],
            overall_rows), "",
      "Per metric, paired over seeds:", "",
      table(["variant", "vs"] + list(analysis.RESULT_KEYS), metric_rows), reasons, ""])


def head_tail_section(report: dict) -> str:
  ht = report["head_tail"]
  rows = []
  for name, v in ht["variants"].items():
    rows.append([name, f"{v['num_head_items']} / {v['num_items']}", v["head"]["users"],
                 v["tail"]["users"], number(v["head"]["hit@10"]), number(v["head"]["ndcg@10"]),
                 number(v["tail"]["hit@10"]), number(v["tail"]["ndcg@10"])])
  return "\n".join([
      "## Head and tail items", "",
      f"Head = the {ht['head_fraction']:.0%} most frequent items by training-part interactions "
      "(ties: lower item index first); a test user is in the group of their test item. Metrics "
      "are recomputed from each run's per-user test ranks and averaged over seeds. "
      + caption(report), "",
      table(["variant", "head items", "head users", "tail users", "head hit@10",
             "head ndcg@10", "tail hit@10", "tail ndcg@10"], rows), ""])


def length_section(report: dict) -> str:
  lengths = report["length_groups"]["variants"]
  names = list(lengths)
  edges = lengths[names[0]]["edges"]
  same = all(lengths[name]["edges"] == edges for name in names)
  labels = analysis.group_labels(edges)
  rows = [["users"] + [g["users"] for g in lengths[names[0]]["groups"]]]
  for name in names:
    rows.append([name] + [f"{number(g['hit@10'])} / {number(g['ndcg@10'])}"
                          for g in lengths[name]["groups"]])
  differ = "" if same else " The variants' test users differ: edges per variant in report.json."
  return "\n".join([
      "## History-length groups", "",
      f"Five groups cut at the 0/20/40/60/80/100th percentiles of the test users' history "
      f"length (edges {', '.join(f'{e:g}' for e in edges)}); a group holds lengths in "
      "[lower, upper), the last also its upper edge, so repeated edges leave a group empty. "
      f"Cells: hit@10 / ndcg@10, mean over seeds.{differ} " + caption(report), "",
      table(["history length"] + labels, rows), ""])


def figures_section(report: dict) -> str:
  lines = ["## Figures", ""]
  captions = {
      "learning_curves": "Learning curves: training loss and validation NDCG@10 by epoch, "
                         "one line per variant and seed.",
      "head_tail": "Test hit@10 and NDCG@10 of head vs tail test items.",
      "length_groups": "Test hit@10 and NDCG@10 by history-length group.",
      "tsne": "t-SNE of reconstructed target representations x0, coloured by KMeans cluster "
              "of x0 (as the DiffuRecSys paper's Figure 3).",
  }
  for name, path in report["figures"].items():
    lines += [f"{captions[name]}", "", f"![{name}]({path})", ""]
  if report["tsne"]:
    t = report["tsne"]
    lines.append(f"t-SNE: run `{t['run']}`, {t['users']} test users (seeded sample), "
                 f"{t['clusters']} clusters of sizes {', '.join(map(str, t['cluster_sizes']))}.")
  else:
    lines.append("No t-SNE: the grid has no trained diffusion variant.")
  return "\n".join(lines) + "\n"


def render(report: dict) -> str:
  sections = [header_section(report), runs_section(report), table3_section(report),
              table4_section(report),
              "## Does the diffusion component matter?\n\n" + report["diffusion"]["sentence"]
              + f"\n\n{caption(report)}\n",
              head_tail_section(report), length_section(report), figures_section(report)]
  return "\n".join(sections)
