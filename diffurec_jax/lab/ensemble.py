"""Seed ensembles (DiffuRecSys Algorithm 3): test accuracy and users/s for S = 1, 2, 4, 8 chains.

`seed_ensembles(workdir)` restores the selected checkpoint once and evaluates the test split
with the run's own sampler and steps, averaging the item distributions of S reverse chains
(`sample.seeds = S`; chain s is keyed as member s of every ensemble, so S = 2 holds the S = 1
chain). Each batch holds eval_batch_size // S users, the same number of chains for every S, so
memory stays bounded. Timing is steps_curve's: batches built first, one warm-up call per batch
shape (compilation, reported apart), then one timed pass. `record` checks that a ledger entry
is this workdir's run and writes the result into it (ledger.write_ensemble).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from tqdm.auto import tqdm

from diffurec_jax import errors
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax import sharding
from diffurec_jax.lab import ledger as ledger_lib
from diffurec_jax.lab import machine as machine_lib
from diffurec_jax.lab import steps_curve
from diffurec_jax.training import workdir as workdir_lib

DEFAULT_CHAINS = (1, 2, 4, 8)
SPLIT = "test"
# What must agree between a workdir's config.json and a ledger entry's for them to be one run.
IDENTITY = ("variant", "seed", "data", "model", "offset_noise")


def parse_chains(text: str) -> tuple[int, ...]:
  """'1,2,4,8' -> (1, 2, 4, 8): distinct integers >= 1, in the order given."""
  words = [word.strip() for word in str(text).split(",")]
  if not text or not all(word.isdigit() and int(word) >= 1 for word in words):
    raise errors.UsageError(f"--seeds={text!r}: give chain counts as integers >= 1 separated "
                            "by commas, e.g. 1,2,4,8.")
  chains = tuple(int(word) for word in words)
  if len(set(chains)) != len(chains):
    raise errors.UsageError(f"--seeds={text!r} repeats a chain count; give each S once.")
  return chains


def check_chains(chains) -> tuple[int, ...]:
  """The chain counts as a tuple of distinct ints >= 1 (UsageError otherwise)."""
  return parse_chains(",".join(str(c) for c in chains))


def ensemble_config(config, chains: int, mesh):
  """`config` with S = `chains` chains and eval_batch_size // S users per batch."""
  batch_users = max(config.train.eval_batch_size // chains, 1)
  data_devices = dict(zip(mesh.axis_names, mesh.axis_sizes))[sharding.AXIS]
  if batch_users % data_devices:
    raise errors.UsageError(
        f"S = {chains} chains leave {batch_users} users per eval batch (train.eval_batch_size "
        f"{config.train.eval_batch_size} // S), not divisible by the {data_devices} devices; "
        "choose chain counts that divide the eval batch size by a multiple of the devices.")
  run_config = config.copy_and_resolve_references()
  run_config.sample.seeds = chains
  run_config.train.eval_batch_size = batch_users
  return run_config


def _differences(workdir_config: dict, entry_config: dict) -> list[str]:
  """Dotted names of the IDENTITY fields whose values differ (missing counts as differing)."""
  def flatten(value, prefix):
    if isinstance(value, dict):
      return {k: v for key in value for k, v in flatten(value[key], f"{prefix}.{key}").items()}
    return {prefix: value}

  names = []
  for field in IDENTITY:
    ours = flatten(workdir_config.get(field), field)
    theirs = flatten(entry_config.get(field), field)
    names += sorted(name for name in set(ours) | set(theirs)
                    if ours.get(name, "<absent>") != theirs.get(name, "<absent>"))
  return names


def check_entry(entry: str, workdir: str):
  """LedgerError unless the ledger entry `entry` records the run of `workdir`: the same
  variant, seed, data, model and offset noise in both config.json files."""
  workdir_config = ledger_lib.read_json(os.path.join(workdir, "config.json"))
  if workdir_config is None:
    raise workdir_lib.WorkdirError(f"{workdir} has no config.json: it is not a diffurec-jax "
                                   "workdir (train one with bin/train.py --workdir).")
  entry_config = ledger_lib.read_json(os.path.join(entry, "config.json"))
  if entry_config is None:
    raise ledger_lib.LedgerError(
        f"{entry} has no config.json: not a ledger entry; give the run's folder "
        "results/<dataset>/<name>/seed<k> (bin/ledger.py add makes it).")
  differing = _differences(workdir_config, entry_config)
  if differing:
    shown = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more"
                                        if len(differing) > 3 else "")
    raise ledger_lib.LedgerError(f"{entry} is not the run of {workdir}: their configs differ "
                                 f"in {shown}; give the entry this workdir was added as.")


def check_checkpoint(entry: str, workdir: str, best_epoch: int):
  """LedgerError when the entry's results.json tested another checkpoint than `best_epoch`,
  the epoch of the workdir's selected one."""
  results = ledger_lib.read_json(os.path.join(entry, "results.json"))
  if results and results.get("best_epoch") != best_epoch:
    raise ledger_lib.LedgerError(
        f"{entry} tested the checkpoint of epoch {results.get('best_epoch')} but {workdir}'s "
        f"selected checkpoint is from epoch {best_epoch}; give the entry of this checkpoint.")


def seed_ensembles(workdir: str, chains=DEFAULT_CHAINS, *, max_users: int = 0,
                   entry: str | None = None, progress: bool = True) -> dict:
  """Test metrics, users/s and per-user ranks of `workdir`'s selected checkpoint with S
  chains for each S in `chains`.

  `max_users` > 0: a fixed random subset of the test users (steps_curve.SUBSET_SEED), the
  same for every S. With `entry`, check_entry and check_checkpoint run before anything is
  evaluated. Returns the
  JSON-ready result (one row per S: 'metrics' as metrics.finalize gives them, 'users_per_s',
  'seconds', 'compile_s', 'batch_users'), plus 'users' [n] and 'ranks' [len(chains), n] int64
  in the order of 'users' (not JSON).
  """
  chains = check_chains(chains)
  if max_users < 0:
    raise errors.UsageError(f"--max_users must be 0 (all users) or positive, got {max_users}.")
  if entry is not None:
    check_entry(entry, workdir)
  loaded, dataset = evaluate_lib.load_with_data(workdir, seeds=1)
  if entry is not None:
    check_checkpoint(entry, workdir, loaded.epoch)
  config = loaded.config
  if config.variant == "sasrec":
    raise errors.UsageError(f"{workdir} holds a SASRec run, which has no reverse chain to "
                            "ensemble; give a diffusion workdir.")
  mesh = sharding.make_mesh(config.catalog.shards)
  run_configs = [ensemble_config(config, s, mesh) for s in chains]  # Errors before any work.
  base = evaluate_lib.Evaluator(config, dataset, mesh)
  total_users = len(base.examples(SPLIT))
  examples = base.examples(SPLIT, max_users, subset_seed=steps_curve.SUBSET_SEED)

  load_before = os.getloadavg()[0]
  rows, ranks = [], []
  for run_config in tqdm(run_configs, desc="seed ensembles", disable=not progress):
    evaluator = evaluate_lib.Evaluator(run_config, dataset, mesh)
    batches = evaluator.batches(examples)
    timed = steps_curve.timed_evaluations(evaluator, loaded.bundle, batches,
                                          [config.sample.seed])
    del batches  # The next S builds its own (smaller) batches.
    (metrics,), (rate,) = timed.per_seed, timed.rates
    rows.append({"S": run_config.sample.seeds,
                 "metrics": {k: v for k, v in metrics.items() if k not in ("users", "seconds")},
                 "users_per_s": rate, "seconds": metrics["seconds"],
                 "compile_s": round(timed.compile_s, 3),
                 "batch_users": run_config.train.eval_batch_size})
    ranks.append(timed.ranks[0])
    logging.info("S=%d hit@10 %.4f ndcg@10 %.4f %.1f users/s", rows[-1]["S"],
                 metrics["hit@10"], metrics["ndcg@10"], rate)
  return {
      "dataset": config.data.name, "variant": config.variant, "seed": config.seed,
      "best_epoch": loaded.epoch, "split": SPLIT, "sampler": config.sample.sampler,
      "steps": config.sample.steps or config.model.diffusion_steps,
      "diffusion_steps": config.model.diffusion_steps, "eta": config.sample.eta,
      "chain_seed": config.sample.seed, "chains": list(chains),
      "n_users": len(examples), "total_users": total_users,
      "subsampled": len(examples) < total_users, "subset_seed": steps_curve.SUBSET_SEED,
      "mask_history": bool(config.train.mask_history),
      "eval_batch_size": config.train.eval_batch_size, "machine": machine_lib.describe(),
      # 1-minute load averages before and after: on a machine shared with a training run the
      # users/s are lower bounds, and the report says so.
      "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
      "rows": rows, "users": examples.users, "ranks": np.stack(ranks),
  }


def record(workdir: str, entry: str, chains=DEFAULT_CHAINS, *, max_users: int = 0,
           command: str = "", progress: bool = True) -> dict:
  """seed_ensembles of `workdir`, checked against and written into the ledger `entry`
  (ensemble.json with `command`, ensemble_ranks.npz); returns the result."""
  result = seed_ensembles(workdir, chains, max_users=max_users, entry=entry, progress=progress)
  payload = {"command": command,
             **{k: v for k, v in result.items() if k not in ("users", "ranks")}}
  ledger_lib.write_ensemble(entry, payload, result["users"], result["chains"], result["ranks"])
  return result
