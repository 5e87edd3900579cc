"""The results ledger: every finished run's small files, kept in the repository.

Layout (one folder per run; nothing else is read):

  results/<dataset>/<name>/seed<k>/
    config.json     the run's config (as the workdir wrote it)
    metrics.jsonl   every training/validation/test record, with wall-clock `wall_s`
    results.json    selection and the single test evaluation (absent for a trial)
    run.json        how it was made: command, machine (CPU model and cores or GPU, jax
                    version), kind (run | trial), free-text notes
    evaluations/*.json   later evaluations of the selected checkpoint (e.g. 1 reverse step)
    test_ranks.npz  every test user's rank (compact, tens of KB): paired tests over users
    ensemble.json   seed ensembles (DiffuRecSys Algorithm 3) of the selected checkpoint:
                    metrics and users/s per number of chains S (lab/ensemble.py)
    ensemble_ranks.npz   each S's per-user test ranks, capped at RANK_CAP (a few KB)

`add_run` copies a workdir into the ledger; `load` reads it back as `Entry` objects, from
which `ledger_report` rebuilds docs/results.md. Runs made at different times, on different
machines or on a GPU add up: nothing in a report is typed by hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil

import numpy as np

from diffurec_jax import errors
from diffurec_jax import metrics as metrics_lib
from diffurec_jax.lab import machine as machine_lib

KINDS = ("run", "trial")
RUN_FILES = ("config.json", "metrics.jsonl", "results.json")
RANKS_FILE = "test_ranks.npz"  # Compact copy of the workdir's (write_ranks).
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_RANKS_FILE = "ensemble_ranks.npz"
# Ranks beyond the largest metric cutoff are stored as this: every reported metric (@5, @10,
# @20) stays exact, and the file compresses to a few KB.
RANK_CAP = max(metrics_lib.KS) + 1


class LedgerError(errors.UserError):
  """A ledger operation that cannot be done as asked, in one sentence for people."""


def run_dir(root: str, dataset: str, name: str, seed: int) -> str:
  return os.path.join(root, dataset, name, f"seed{seed}")


def add_run(workdir: str, root: str, name: str, *, command: str, kind: str = "run",
            notes: str = "", machine: dict | None = None, overwrite: bool = False) -> str:
  """Copies `workdir`'s small files into the ledger under `name`; returns the folder.

  A `run` must be finished (results.json present); a `trial` (a recipe-search run stopped
  early on purpose) needs only its config and metrics.
  """
  if kind not in KINDS:
    raise LedgerError(f"kind={kind!r}; use one of {KINDS}.")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise LedgerError(f"{workdir} has no config.json: not a diffurec-jax workdir.")
  with open(config_path) as f:
    config = json.load(f)
  if kind == "run" and not os.path.exists(os.path.join(workdir, "results.json")):
    raise LedgerError(f"{workdir} has no results.json: the run is not finished (finish it, or "
                      "add it with --kind trial).")
  target = run_dir(root, config["data"]["name"], name, int(config["seed"]))
  if os.path.exists(target) and not overwrite:
    raise LedgerError(f"{target} exists; pass --overwrite to replace it.")
  os.makedirs(target, exist_ok=True)
  for file_name in RUN_FILES:
    source = os.path.join(workdir, file_name)
    if os.path.exists(source):
      shutil.copyfile(source, os.path.join(target, file_name))
  evaluations = os.path.join(workdir, "evaluations")
  if os.path.isdir(evaluations):
    shutil.copytree(evaluations, os.path.join(target, "evaluations"), dirs_exist_ok=True)
  ranks = os.path.join(workdir, "test_ranks.npz")
  if os.path.exists(ranks):
    write_ranks(ranks, os.path.join(target, RANKS_FILE))
  run = {"command": command, "kind": kind, "notes": notes,
         "machine": machine or machine_lib.describe(),
         "added": datetime.date.today().isoformat()}
  with open(os.path.join(target, "run.json"), "w") as f:
    json.dump(run, f, indent=2, sort_keys=True)
  return target


def write_ranks(test_ranks: str, path: str):
  """The run's per-user test ranks, compact (a few tens of KB): users int32, ranks as the
  smallest unsigned type that holds them, compressed. For paired tests over users."""
  with np.load(test_ranks) as saved:
    users, ranks = saved["users"].astype(np.int32), saved["ranks"]
  dtype = np.uint16 if ranks.max(initial=0) < 2**16 else np.uint32
  np.savez_compressed(path, users=users, ranks=ranks.astype(dtype))


def _read_arrays(path: str, names: tuple[str, ...]) -> dict | None:
  """{name: int64 array} of an npz file, or None when it does not exist."""
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    return {name: saved[name].astype(np.int64) for name in names}


def read_ranks(folder: str) -> dict | None:
  """{'users': [n], 'ranks': [n]} (int64) of a ledger entry, or None when not recorded."""
  return _read_arrays(os.path.join(folder, RANKS_FILE), ("users", "ranks"))


def evaluation_path(workdir: str, label: str) -> str:
  """workdir/evaluations/<label as a file name>.json: where an evaluation is recorded."""
  slug = "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
  return os.path.join(workdir, "evaluations", f"{slug}.json")


def write_evaluation(workdir: str, label: str, split: str, metrics: dict, *, command: str,
                     settings: dict):
  """Records a later evaluation of a run's selected checkpoint in workdir/evaluations/."""
  path = evaluation_path(workdir, label)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  payload = {"label": label, "split": split, "metrics": metrics, "command": command,
             "settings": settings}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)


def write_ensemble(folder: str, payload: dict, users: np.ndarray, chains: list[int],
                   ranks: np.ndarray):
  """Writes a seed-ensemble evaluation into a ledger entry: `payload` as ensemble.json, and
  users [n], chains [C] (S of each row) and ranks [C, n] (capped at RANK_CAP, uint8) as
  ensemble_ranks.npz."""
  ranks = np.asarray(ranks)
  assert ranks.shape == (len(chains), len(users)), (ranks.shape, len(chains), len(users))
  with open(os.path.join(folder, ENSEMBLE_FILE), "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  np.savez_compressed(os.path.join(folder, ENSEMBLE_RANKS_FILE),
                      users=np.asarray(users, np.int32), chains=np.asarray(chains, np.int32),
                      ranks=np.minimum(ranks, RANK_CAP).astype(np.uint8))


def read_ensemble_ranks(folder: str) -> dict | None:
  """{'users': [n], 'chains': [C], 'ranks': [C, n]} (int64, ranks capped at RANK_CAP) of a
  ledger entry's seed ensembles, or None when not recorded."""
  return _read_arrays(os.path.join(folder, ENSEMBLE_RANKS_FILE), ("users", "chains", "ranks"))


@dataclasses.dataclass
class Entry:
  """One run of the ledger."""
  dataset: str
  name: str
  seed: int
  config: dict
  metrics: list
  results: dict | None
  run: dict
  evaluations: list
  ensemble: dict | None = None  # ensemble.json (seed ensembles), when recorded.

  @property
  def kind(self) -> str:
    return self.run.get("kind", "run")

  def records(self, split: str) -> list[dict]:
    """Records of `split`, one per epoch (a repeated epoch keeps its last record)."""
    by_epoch = {}
    for record in self.metrics:
      if record.get("split") == split:
        by_epoch[record.get("epoch")] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch, key=lambda e: (e is None, e))]

  def best_valid(self) -> dict | None:
    if self.results:
      epoch = self.results["best_epoch"]
      for record in self.records("valid"):
        if record["epoch"] == epoch:
          return record
    valid = self.records("valid")
    return max(valid, key=lambda r: r.get("ndcg@10", -1)) if valid else None


def read_json(path: str):
  """The JSON file at `path`, or None when there is none."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load(root: str) -> list[Entry]:
  """Every run under `root`, sorted by (dataset, name, seed)."""
  entries = []
  if not os.path.isdir(root):
    return entries
  for dataset in sorted(os.listdir(root)):
    if not os.path.isdir(os.path.join(root, dataset)):
      continue
    for name in sorted(os.listdir(os.path.join(root, dataset))):
      if not os.path.isdir(os.path.join(root, dataset, name)):
        continue  # e.g. results/<dataset>/notes.md
      for seed_dir in sorted(os.listdir(os.path.join(root, dataset, name))):
        folder = os.path.join(root, dataset, name, seed_dir)
        if not (seed_dir.startswith("seed") and os.path.isdir(folder)):
          continue
        config = read_json(os.path.join(folder, "config.json"))
        if config is None:
          raise LedgerError(f"{folder} has no config.json; remove the folder or re-add the run.")
        metrics = []
        path = os.path.join(folder, "metrics.jsonl")
        if os.path.exists(path):
          with open(path) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        evaluations = []
        evaluations_dir = os.path.join(folder, "evaluations")
        if os.path.isdir(evaluations_dir):
          evaluations = [read_json(os.path.join(evaluations_dir, file_name))
                         for file_name in sorted(os.listdir(evaluations_dir))
                         if file_name.endswith(".json")]
        entries.append(Entry(dataset, name, int(seed_dir[4:]), config, metrics,
                             read_json(os.path.join(folder, "results.json")),
                             read_json(os.path.join(folder, "run.json")) or {}, evaluations,
                             read_json(os.path.join(folder, ENSEMBLE_FILE))))
  return entries
