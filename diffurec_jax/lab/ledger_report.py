"""docs/results.md and its figures, rebuilt from the results ledger alone.

  python bin/ledger.py report [--root results] [--out docs/results.md]

Every number on the page comes from a file under results/ (see `ledger`) or from the
published figures that ship with the package (`report.published_results`); no path of the
machine that built the page is printed.
"""

from __future__ import annotations

import math
import os
import statistics

from diffurec_jax.lab import ledger as ledger_lib
from diffurec_jax.lab import plots
from diffurec_jax.lab import report as report_lib
from diffurec_jax.lab import user_tests as user_tests_lib
from diffurec_jax.lab import verdict as verdict_lib

HEADLINE = ("hit@10", "ndcg@10")
ALL_METRICS = ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10")
# Which published rows a ledger run is compared with, by its variant (the first one present).
PAPER_ROWS = {"diffurec": ("DiffuRec (TOIS 2023)",), "v1": ("DiffuRecSys V1 (paper)",),
              "v2": ("DiffuRecSys V2 (paper)",),
              "sasrec": ("SASRec-CE (RecBole, third party)", "SASRec (DiffuRecSys Table 5)")}
DATASET_TITLES = {"toys": "Amazon Toys", "beauty": "Amazon Beauty", "ml-1m": "MovieLens-1M"}


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def percent(mean, std=None, seeds=1) -> str:
  """A fraction in percent, 2 decimals; "mean ± std" over more than one seed; "-" for None."""
  if mean is None:
    return "-"
  text = f"{100 * mean:.2f}"
  return text + (f" ± {100 * std:.2f}" if seeds > 1 else "")


def _minutes(seconds) -> str:
  return "-" if seconds is None else f"{seconds / 60:.1f}"


def _elapsed_note(row: dict) -> str:
  """' (elapsed 147.1)' when pauses between resumes made the elapsed time 5% longer."""
  active, elapsed = row["minutes_total"], row.get("elapsed_total")
  if active is None or elapsed is None or elapsed <= 1.05 * active:
    return ""
  return f" (elapsed {_minutes(elapsed)})"


def _paper_label(dataset: str, variant: str) -> str | None:
  published = report_lib.published_results(dataset)
  return next((label for label in PAPER_ROWS.get(variant, ()) if label in published), None)


def published_row(dataset: str, variant: str) -> dict | None:
  """The published test figures a `variant` run on `dataset` is compared with, or None."""
  label = _paper_label(dataset, variant)
  return report_lib.published_results(dataset)[label] if label else None


def group_runs(entries):
  """{(dataset, name): [Entry]} of finished runs (kind 'run')."""
  groups = {}
  for entry in entries:
    if entry.kind == "run" and entry.results:
      groups.setdefault((entry.dataset, entry.name), []).append(entry)
  return groups


def _stopped_early(results: dict, train: dict) -> bool:
  """Early stopping fired: fewer epochs than configured, or the last `patience` validations
  after the best one (config.json keeps the first num_epochs of a resumed, extended run)."""
  epochs, best = results["epochs_run"], results.get("best_epoch", results["epochs_run"])
  patience = train.get("patience", 0) * train.get("eval_every", 1)
  return epochs < train["num_epochs"] or (patience > 0 and epochs - best >= patience)


def _made_text(made: dict) -> str:
  """`command` on machine (jax x); how it ended. Notes: ... (one seed of a ledger row)."""
  note = f" Notes: {made['notes'].rstrip('.')}." if made["notes"] else ""
  early = ("early stopping fired" if made["stopped_early"]
           else "ended at its last epoch (not stopped early)")
  machine = made["machine"]
  return (f"`{made['command']}` on {_machine_text(machine)} (jax {machine.get('jax', '?')}); "
          f"{early}.{note}")


def elapsed_seconds(records: list[dict]) -> float | None:
  """Wall-clock from the run's start to its last record, pauses between resumes included:
  the first record's `wall_s` (its time since the start) plus the span of the records' `time`
  stamps. None without time stamps. `wall_s` itself counts only time a process was running."""
  stamped = [r for r in records if "time" in r and "wall_s" in r]
  if not stamped:
    return None
  return stamped[0]["wall_s"] + stamped[-1]["time"] - stamped[0]["time"]


def summary_row(dataset, name, runs) -> dict:
  """One table row: test metrics mean/std over seeds, the paper's, time and epochs."""
  row = {"dataset": dataset, "name": name, "seeds": len(runs),
         "variant": runs[0].config.get("variant", "diffurec")}
  for metric in ALL_METRICS:
    row[metric] = _mean_std([r.results["test"].get(metric) for r in runs])
  best_times = []
  for run in runs:
    best = run.best_valid()
    best_times.append(best.get("wall_s") if best else None)
  row["minutes_to_best"] = _mean_std(best_times)[0]
  row["minutes_total"] = _mean_std([r.results.get("wall_s") for r in runs])[0]
  row["elapsed_total"] = _mean_std([elapsed_seconds(r.metrics) for r in runs])[0]
  row["best_epoch"] = [r.results["best_epoch"] for r in runs]
  row["epochs_run"] = [r.results["epochs_run"] for r in runs]
  # Early stopping fired when the run ended before its configured last epoch.
  row["stopped_early"] = [_stopped_early(r.results, r.config["train"]) for r in runs]
  row["paper"] = published_row(dataset, row["variant"])
  row["paper_label"] = _paper_label(dataset, row["variant"])
  row["machine"] = runs[0].run.get("machine", {})
  row["command"] = runs[0].run.get("command", "")
  row["made"] = [{"seed": r.config.get("seed", 0), "command": r.run.get("command", ""),
                  "machine": r.run.get("machine", {}), "notes": r.run.get("notes", ""),
                  "stopped_early": early}
                 for r, early in zip(runs, row["stopped_early"])]
  row["mask_history"] = any(r.results.get("mask_history") for r in runs)
  diffusion = row["variant"] != "sasrec"
  row["valid"] = (runs[0].results.get("valid_users"),
                  runs[0].results.get("valid_steps") if diffusion else "n/a")
  row["test_steps"] = runs[0].results.get("sample_steps") if diffusion else "n/a"
  return row


def _machine_text(machine: dict) -> str:
  if not machine:
    return "-"
  if machine.get("platform") == "cpu":
    return f"{machine.get('cpu', 'CPU')}, {machine.get('cores')} cores"
  return machine.get("device", "-")


def time_to_accuracy_figure(dataset, entries, path):
  """Validation NDCG@10 against wall-clock minutes, one line per run; paper values dashed."""
  curves = []
  for entry in entries:
    points = [(r["wall_s"] / 60, r["ndcg@10"]) for r in entry.records("valid")
              if r.get("wall_s") is not None]
    if points:
      trial = entry.kind == "trial"
      curves.append({"name": entry.name, "trial": trial, "points": points,
                     "label": f"{entry.name} s{entry.seed}" + (" (trial)" if trial else "")})
  references = {}  # One line per variant with a published row.
  for entry in entries:
    variant = entry.config.get("variant", "diffurec")
    paper = published_row(dataset, variant)
    if paper and variant not in references:
      references[variant] = (f"{_paper_label(dataset, variant)}: test NDCG@10", paper["ndcg@10"])
  plots.time_to_accuracy(
      curves, list(references.values()),
      f"{DATASET_TITLES.get(dataset, dataset)}: validation NDCG@10 vs wall-clock", path)


def trial_table(dataset, trials) -> list[str]:
  """Recipe search: validation NDCG@10 each trial reached at the same wall-clock budgets."""
  if not trials:
    return []
  budget = min(max((r.get("wall_s") or 0) for r in t.records("valid")) for t in trials
               if t.records("valid"))
  lines = [f"Recipe search on {DATASET_TITLES.get(dataset, dataset)} (runs stopped on purpose "
           "after a few epochs; equal wall-clock):", "",
           "| trial | what differs | valid NDCG@10 at epoch 1 | at epoch 2 | best within 1.05 x "
           f"{budget / 60:.1f} min | command |", "|---|---|---|---|---|---|"]
  for trial in trials:
    valid = trial.records("valid")
    by_epoch = {r["epoch"]: r for r in valid}
    within = [r["ndcg@10"] for r in valid if (r.get("wall_s") or math.inf) <= 1.05 * budget]
    cell = lambda e: (f"{by_epoch[e]['ndcg@10']:.4f} ({by_epoch[e]['wall_s'] / 60:.1f} min)"
                      if e in by_epoch and by_epoch[e].get("wall_s") else "-")
    lines.append(f"| {trial.name} | {trial.run.get('notes', '')} | {cell(1)} | {cell(2)} | "
                 f"{max(within):.4f} | `{trial.run.get('command', '')}` |" if within else
                 f"| {trial.name} | {trial.run.get('notes', '')} | - | - | - | |")
  return lines + [""]


def evaluation_rows(entries) -> list[str]:
  lines = []
  for entry in entries:
    for evaluation in entry.evaluations:
      metrics = evaluation["metrics"]
      base = entry.results["test"] if entry.results and evaluation["split"] == "test" else {}
      delta = (f"{100 * (metrics['ndcg@10'] - base['ndcg@10']):+.2f}"
               if base.get("ndcg@10") is not None else "-")
      lines.append(f"| {entry.dataset} | {entry.name} s{entry.seed} | {evaluation['label']} | "
                   f"{evaluation['split']} | {percent(metrics.get('hit@10'))} | "
                   f"{percent(metrics.get('ndcg@10'))} | {delta} | `{evaluation['command']}` |")
  if not lines:
    return []
  return (["## Later evaluations of selected checkpoints", "",
           "| dataset | run | evaluation | split | HR@10 % | NDCG@10 % | NDCG@10 vs the run's "
           "test (points) | command |", "|---|---|---|---|---|---|---|---|"] + lines + [""])


def _users_text(ensemble: dict) -> str:
  if ensemble["subsampled"]:
    return (f"{ensemble['n_users']} of {ensemble['total_users']} test users (a fixed random "
            f"subset, seed {ensemble['subset_seed']}; its users/s mostly times the padding of "
            "each length bucket's last batch)")
  return f"all {ensemble['n_users']} test users"


def _load_text(ensemble: dict) -> str:
  """How busy the machine was (1-minute load averages, when recorded): above half its cores,
  something else was running and the users/s are lower bounds."""
  load = ensemble.get("load_average")
  if not load:
    return ""
  machine = ensemble["machine"]
  cores = machine.get("cpu_count") or machine.get("cores") or 1
  text = f"; load average {load[0]:.1f} before, {load[1]:.1f} after"
  if max(load) > cores / 2:
    text += (f" on {cores} cores: the machine was shared (a training run), so its users/s are "
             "lower bounds, not speed measurements")
  return text


def ensemble_section(root: str, entries) -> list[str]:
  """'Seed ensembles (DiffuRecSys Algorithm 3)': one row per (run, S) of the entries that
  hold an ensemble.json; nothing when none does."""
  entries = [e for e in entries if e.ensemble and e.kind == "run"]
  if not entries:
    return []
  lines = ["### Seed ensembles (DiffuRecSys Algorithm 3)", "",
           "The selected checkpoint tested again with the item distributions of S reverse "
           "chains averaged (S = 1 is the run's own test evaluation). Each batch holds "
           "eval batch size // S users, so every S runs the same number of chains per batch; "
           "users/s is one timed pass over the test users after a warm-up call per batch shape "
           "(compilation excluded). p: paired t-test over users (scipy.stats.ttest_rel, "
           "two-sided) of per-user NDCG@10 against S = 1. Users moved: those whose target's "
           "rank differs from S = 1's (ranks past 20 count as one).", "",
           "| run | S | HR@10 % | NDCG@10 % | NDCG@10 vs S = 1 (points) | p | users moved | "
           "users/s | command |", "|---|---|---|---|---|---|---|---|---|"]
  notes, tested = [], []
  for entry in entries:
    ensemble, label = entry.ensemble, f"{entry.name} s{entry.seed}"
    rows = user_tests_lib.ensemble_rows(root, entry)
    tested.append((label, ensemble["n_users"], rows))
    for index, row in enumerate(rows):
      delta = "-" if row["delta"] is None else f"{100 * row['delta']:+.2f}"
      p = user_tests_lib.p_text(row["test"])
      moved = "-" if row["changed"] is None else f"{row['changed']} of {ensemble['n_users']}"
      command = f"`{ensemble['command']}`" if index == 0 else ""
      lines.append(f"| {label} | {row['S']} | {percent(row['metrics']['hit@10'])} | "
                   f"{percent(row['metrics']['ndcg@10'])} | {delta} | {p} | {moved} | "
                   f"{row['users_per_s']:.1f} | {command} |")
    machine = ensemble["machine"]
    warm_up = ", ".join(f"{row['S']}: {row['compile_s']:.1f}" for row in ensemble["rows"])
    notes.append(
        f"- **{label}**: best epoch {ensemble['best_epoch']}, {ensemble['sampler']} sampler, "
        f"{ensemble['steps']} steps; {_users_text(ensemble)}; history "
        f"{'masked' if ensemble['mask_history'] else 'not masked'}; batches of "
        f"{ensemble['eval_batch_size']} // S users; warm-up s (compilation and one batch per "
        f"shape) by S: {warm_up}; on "
        f"{_machine_text(machine)} (jax {machine.get('jax', '?')}){_load_text(ensemble)}.")
  return lines + [""] + notes + [""] + verdict_lib.ensemble_verdict(tested)


def build_markdown(root: str, figures_dir: str, figures_link: str) -> str:
  """The whole page; writes the figures into `figures_dir` (linked as `figures_link`)."""
  entries = ledger_lib.load(root)
  groups = group_runs(entries)
  lines = [
      "# Results", "",
      "Rebuilt from the results ledger (`results/`) by `python bin/ledger.py report`; never "
      "edited by hand. Protocol: leave-one-out by time, full ranking over all items (the "
      "padding item never ranked), ties counted pessimistically, metrics averaged over users, "
      "the checkpoint selected on validation and tested once. Percentages. History items are "
      "not masked unless a row says so. Paper columns are the published test figures that ship "
      "with the package (`diffurec_jax/reference/published_results.json`).", ""]
  if not entries:
    return "\n".join(lines + ["The ledger is empty: add runs with `python bin/ledger.py add`.", ""])
  os.makedirs(figures_dir, exist_ok=True)
  for dataset in sorted({e.dataset for e in entries}):
    title = DATASET_TITLES.get(dataset, dataset)
    rows = [summary_row(d, n, runs) for (d, n), runs in sorted(groups.items()) if d == dataset]
    lines += [f"## {title}", ""]
    if rows:
      lines += ["| run | seeds | test HR@10 | test NDCG@10 | paper HR@10 / NDCG@10 | NDCG@10 "
                "vs paper (points) | best epoch / run | minutes to best / total (elapsed) | "
                "validation "
                "(users, steps) | test steps |", "|---|---|---|---|---|---|---|---|---|---|"]
      for row in rows:
        paper = row["paper"]
        paper_text = (f"{100 * paper['hit@10']:.2f} / {100 * paper['ndcg@10']:.2f} "
                      f"({row['paper_label']})" if paper else "-")
        gap = (f"{100 * (row['ndcg@10'][0] - paper['ndcg@10']):+.2f}" if paper else "-")
        epochs = ", ".join(f"{b}/{e}" for b, e in zip(row["best_epoch"], row["epochs_run"]))
        lines.append(
            f"| {row['name']} | {row['seeds']} | {percent(*row['hit@10'], row['seeds'])} | "
            f"{percent(*row['ndcg@10'], row['seeds'])} | {paper_text} | {gap} | {epochs} | "
            f"{_minutes(row['minutes_to_best'])} / {_minutes(row['minutes_total'])}"
            f"{_elapsed_note(row)} | "
            f"{row['valid'][0]}, {row['valid'][1]} | {row['test_steps']} |")
      lines += ["", "All test metrics (mean over seeds, percent):", "",
                "| run | " + " | ".join(ALL_METRICS) + " | history masked |",
                "|---|" + "---|" * (len(ALL_METRICS) + 1)]
      for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(
            percent(row[m][0]) for m in ALL_METRICS) + f" | {'yes' if row['mask_history'] else 'no'} |")
      lines += ["", "How each run was made:", ""]
      for row in rows:
        made = [_made_text(m) for m in row["made"]]
        if len(made) == 1:
          lines.append(f"- **{row['name']}**: {made[0]}")
        else:
          lines.append(f"- **{row['name']}**, {len(made)} seeds:")
          lines += [f"  - seed {m['seed']}: {text}" for m, text in zip(row["made"], made)]
      lines.append("")
    tests = user_tests_lib.user_tests(root, dataset, entries)
    lines += user_tests_lib.user_tests_section(tests)
    lines += verdict_lib.verdict(title, [r for r in rows if r["seeds"]], tests)
    lines += ensemble_section(root, [e for e in entries if e.dataset == dataset])
    notes = os.path.join(root, dataset, "notes.md")
    if os.path.exists(notes):  # Prose kept beside the runs (what was tried, what is next).
      with open(notes) as f:
        lines += [f.read().strip(), ""]
    dataset_entries = [e for e in entries if e.dataset == dataset]
    lines += trial_table(dataset, [e for e in dataset_entries if e.kind == "trial"])
    figure_name = f"ledger_{dataset}_time_to_accuracy.png"
    time_to_accuracy_figure(dataset, dataset_entries, os.path.join(figures_dir, figure_name))
    lines += [f"![{title}: validation NDCG@10 against wall-clock minutes]"
              f"({figures_link}/{figure_name})", ""]
  lines += evaluation_rows([e for e in entries if e.evaluations])
  return "\n".join(lines)


def write(root: str, out: str, readme: str | None = None) -> str:
  """docs/results.md (`out`) and its figures; with `readme`, also that file's results block
  (readme_block.py), where it has one."""
  figures_dir = os.path.join(os.path.dirname(out) or ".", "figures")
  text = build_markdown(root, figures_dir, "figures")
  with open(out, "w") as f:
    f.write(text + "\n")
  if readme and os.path.exists(readme):
    from diffurec_jax.lab import readme_block
    readme_block.update(readme, root)
  return out
