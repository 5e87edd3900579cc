"""The accuracy-vs-steps curve: test metrics and users/s of a trained workdir at K reverse steps.

`steps_curve(workdir)` restores the best checkpoint once and evaluates it with every sampler
('reverse', 'ddim') at every number of kept steps K (respaced, `sample.steps = K`), once per
chain seed, plus Algorithm 3's 'one_step' start as a reference. Evaluation is the same
fixed-shape, bucketed, padded full ranking as `evaluate.Evaluator` (with every user, the
numbers are identical), optionally on a fixed random subset of users, the same for every K.
Wall time is measured after one warm-up call per batch shape, so compilation is excluded
(and reported separately). `write_report` writes steps.json, steps.md and steps.png.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax import errors
from diffurec_jax.lab import machine as machine_lib
from diffurec_jax import samplers as sample
from diffurec_jax import sharding
from diffurec_jax.data import splits

CURVE_SAMPLERS = ("reverse", "ddim")  # Samplers with a K; 'one_step' is one reference row.
HEADLINE = ("ndcg@10", "hit@10")
SUBSET_SEED = 0  # The users of a --max_users subset; fixed so every K sees the same users.


def _std(values: list[float]) -> float | None:
  """Sample standard deviation (ddof = 1); None for a single seed."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize(sampler: str, steps: int | None, per_seed: list[dict], rates: list[float],
              compile_s: float, *, mask_history: bool, eta: float | None) -> dict:
  """One row of the curve from the per-seed metrics and users/s of one (sampler, K)."""
  row = {"sampler": sampler, "K": steps, "calls": 1 if steps is None else steps, "eta": eta}
  for name in HEADLINE:
    values = [result[name] for result in per_seed]
    row[f"{name}_mean"] = float(np.mean(values))
    row[f"{name}_std"] = _std(values)
  row["users_per_s"] = float(statistics.median(rates))
  row["compile_s"] = round(compile_s, 3)
  row["n_users"] = per_seed[0]["users"]
  row["mask_history"] = mask_history
  names = [name for name in per_seed[0] if name not in ("users", "seconds")]
  row["mean"] = {name: float(np.mean([result[name] for result in per_seed])) for name in names}
  row["per_seed"] = per_seed
  return row


class Timed(NamedTuple):
  """One config's timed evaluations: per chain seed its metrics (with 'seconds'), users/s
  and ranks [n_users] (int64, in the examples' order); compile_s: the warm-up's seconds."""
  per_seed: list[dict]
  rates: list[float]
  ranks: list[np.ndarray]
  compile_s: float


def timed_evaluations(evaluator, bundle, batches, chain_seeds) -> Timed:
  """One warm-up call per batch shape (compilation, excluded from the timing), then one
  timed evaluation of every batch per seed in `chain_seeds` (keys evaluator.key(seed))."""
  bundle = evaluate_lib.place(bundle, evaluator.mesh)  # An item-sharded run's table.
  compile_s = evaluator.warm_up(bundle, batches)
  per_seed, rates, ranks = [], [], []
  for seed in chain_seeds:
    result, seed_ranks, seconds = evaluator.evaluate_batches(bundle, batches,
                                                             evaluator.key(seed))
    result["seconds"] = round(seconds, 4)
    per_seed.append(result)
    rates.append(len(seed_ranks) / seconds)
    ranks.append(seed_ranks)
  return Timed(per_seed, rates, ranks, compile_s)


def _check_arguments(ks, samplers, seeds, split, max_users, eta):
  if not ks:
    raise errors.UsageError("No step counts given; pass --ks such as 1,2,4,8,16,32.")
  bad = [k for k in ks if int(k) != k or k < 1]
  if bad:
    raise errors.UsageError(f"Step counts must be integers >= 1, got {bad} in --ks.")
  unknown = [s for s in samplers if s not in sample.SAMPLERS]
  if unknown:
    raise errors.UsageError(f"Unknown sampler(s) {unknown}; choose from {', '.join(sample.SAMPLERS)}.")
  if seeds < 1:
    raise errors.UsageError(f"--seeds must be at least 1, got {seeds}.")
  if split not in splits.SPLITS:
    raise errors.UsageError(f"split must be one of {splits.SPLITS}, got {split!r}.")
  if max_users < 0:
    raise errors.UsageError(f"--max_users must be 0 (all users) or positive, got {max_users}.")
  if not 0.0 <= eta <= 1.0:
    raise errors.UsageError(f"DDIM eta must be in [0, 1], got {eta}.")


def steps_curve(workdir: str, ks=(1, 2, 4, 8, 16, 32), samplers=CURVE_SAMPLERS, seeds: int = 3,
                split: str = "test", max_users: int = 0, eta: float = 0.0,
                progress: bool = True, one_step: bool = True, keep_ranks: bool = False) -> dict:
  """Metrics and users/s of `workdir`'s best checkpoint for every sampler and K.

  Each (sampler, K) runs `seeds` single chains (sample.seed = 0..seeds-1, sample.seeds = 1);
  rows hold the mean and std (ddof = 1) over seeds of ndcg@10 and hit@10, the mean of every
  metric, the per-seed metrics, and the median users/s. K > diffusion_steps is skipped with a
  note. With `one_step` (or 'one_step' in samplers) one reference row of Algorithm 3's start
  (a single approximator call, K = None) is added. With `keep_ranks` every row also holds
  'ranks', int64 [seeds, n_users] in the order of the result's 'users' (not written to JSON).
  """
  samplers = tuple(dict.fromkeys(samplers))
  _check_arguments(list(ks), samplers, seeds, split, max_users, eta)
  ks = sorted({int(k) for k in ks})
  loaded, dataset = evaluate_lib.load_with_data(workdir, seeds=1)
  config = loaded.config
  if config.variant == "sasrec":
    raise errors.UsageError(f"{workdir} holds a SASRec run, which has no reverse chain; "
                     "give a diffusion workdir.")
  num_train_steps = config.model.diffusion_steps
  notes = []
  skipped = [k for k in ks if k > num_train_steps]
  if skipped:
    notes.append(f"K = {skipped} skipped: more than the {num_train_steps} training steps.")
    logging.warning(notes[-1])
  ks = [k for k in ks if k <= num_train_steps]
  curve_samplers = [s for s in samplers if s != "one_step"]
  if curve_samplers and not ks:
    raise errors.UsageError(f"Every K in --ks exceeds the {num_train_steps} diffusion steps "
                     f"of {workdir}; choose K between 1 and {num_train_steps}.")
  one_step = one_step or "one_step" in samplers

  mesh = sharding.make_mesh(config.catalog.shards)
  sharding.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  evaluator = evaluate_lib.Evaluator(config, dataset, mesh)
  total_users = len(evaluator.examples(split))
  examples = evaluator.examples(split, max_users, subset_seed=SUBSET_SEED)
  batches = evaluator.batches(examples)
  mask_history = bool(config.train.mask_history)

  runs = [(s, k) for s in curve_samplers for k in ks] + ([("one_step", None)] if one_step else [])
  rows = []
  bar = tqdm(runs, desc="steps curve", disable=not progress)
  for sampler, steps in bar:
    bar.set_postfix(sampler=sampler, K=steps)
    run_config = config.copy_and_resolve_references()
    run_config.sample.update(sampler=sampler, steps=steps or 0, seeds=1, eta=eta)
    run_evaluator = evaluate_lib.Evaluator(run_config, dataset, mesh)
    timed = timed_evaluations(run_evaluator, loaded.bundle, batches, range(seeds))
    rows.append(summarize(sampler, steps, timed.per_seed, timed.rates, timed.compile_s,
                          mask_history=mask_history, eta=eta if sampler == "ddim" else None))
    if keep_ranks:
      rows[-1]["ranks"] = np.stack(timed.ranks)
    logging.info("%s K=%s ndcg@10 %.4f hit@10 %.4f %.1f users/s", sampler, steps,
                 rows[-1]["ndcg@10_mean"], rows[-1]["hit@10_mean"], rows[-1]["users_per_s"])
  result = {
      "workdir": str(workdir), "dataset": config.data.name, "variant": config.variant,
      "best_epoch": loaded.epoch, "split": split, "diffusion_steps": num_train_steps,
      "schedule": config.model.schedule, "reverse_variance": config.model.reverse_variance,
      "eta": eta, "seeds": seeds, "ks": ks, "samplers": list(curve_samplers),
      "n_users": len(examples), "total_users": total_users,
      "subsampled": len(examples) < total_users, "subset_seed": SUBSET_SEED,
      "mask_history": mask_history, "eval_batch_size": config.train.eval_batch_size,
      "machine": machine_lib.describe(), "compile_s": round(sum(r["compile_s"] for r in rows), 3),
      "notes": notes, "rows": rows,
  }
  if keep_ranks:
    result["users"] = examples.users
  return result


# Reports ---------------------------------------------------------------------------------------


def _mean_std(row: dict, name: str) -> str:
  std = row[f"{name}_std"]
  return f"{row[f'{name}_mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def table(result: dict) -> str:
  """The rows as a Markdown table."""
  lines = ["| sampler | K | approximator calls | ndcg@10 | hit@10 | users/s | compile s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for row in result["rows"]:
    steps = "–" if row["K"] is None else str(row["K"])
    lines.append(f"| {row['sampler']} | {steps} | {row['calls']} | {_mean_std(row, 'ndcg@10')} "
                 f"| {_mean_std(row, 'hit@10')} | {row['users_per_s']:.1f} "
                 f"| {row['compile_s']:.1f} |")
  return "\n".join(lines)


def markdown(result: dict, command: str) -> str:
  """steps.md: the command, the setting and the table."""
  users = (f"{result['n_users']} of {result['total_users']} users, a fixed random subset "
           f"(seed {result['subset_seed']}, the same for every K)" if result["subsampled"]
           else f"all {result['n_users']} users")
  machine_info = result["machine"]
  lines = [
      f"# Accuracy vs reverse steps: {result['dataset']} ({result['variant']})", "",
      "```", command, "```", "",
      f"- workdir: `{result['workdir']}` (best epoch {result['best_epoch']}), "
      f"{result['split']} split, full ranking",
      f"- users: {users}",
      f"- history items masked from the ranking: {'yes' if result['mask_history'] else 'no'}",
      f"- T = {result['diffusion_steps']} training steps ({result['schedule']}), reverse "
      f"variance {result['reverse_variance']}, DDIM eta = {result['eta']}; K kept steps are "
      "respaced (evenly spaced, always including T - 1)",
      f"- {result['seeds']} chain seed(s) per row (one chain each): mean ± std (ddof = 1); "
      "users/s is the median over seeds of the device time of the whole split (batches built "
      "and placed beforehand), after a warm-up call per batch shape (compile s is that "
      "warm-up; small when the persistent XLA compilation cache already holds the step)",
      f"- machine: {machine_info['os']}, {machine_info['cpu_count']} CPUs, "
      f"jax {machine_info['jax']} on {machine_info['device']} ({machine_info['backend']})",
      f"- eval batch size {result['eval_batch_size']}",
  ]
  lines += [f"- note: {note}" for note in result["notes"]]
  lines += ["", table(result), ""]
  return "\n".join(lines)


def write_report(result: dict, directory: str, command: str) -> dict[str, str]:
  """Writes steps.json, steps.md and steps.png under `directory`; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(directory, f"steps.{name}") for name in ("json", "md", "png")}
  rows = [{k: v for k, v in row.items() if k != "ranks"} for row in result["rows"]]
  saved = {k: v for k, v in result.items() if k != "users"}
  with open(paths["json"], "w") as f:
    json.dump({"command": command, **saved, "rows": rows}, f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(markdown(result, command))
  from diffurec_jax.lab import plots  # matplotlib only for the PNG (pip install '.[report]').
  plots.accuracy_vs_steps(result, paths["png"])
  return paths
