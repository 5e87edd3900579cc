"""A workdir owns a run: config.json, metrics.jsonl, id_map.npz, checkpoints/, results.json.

Only process 0 writes. A rerun with the same config resumes; a different config in the same
workdir is refused (naming the fields that differ) so two runs never mix.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

# Fields that may change between a run and its resumption: where data lives, evaluation batch
# size (results are per-user keyed, so identical), and num_epochs (to extend a run, or to end
# it at its last checkpoint: the best-on-validation checkpoint is then tested).
_RESUMABLE_CHANGES = ("data.root", "data.cache_dir", "data.download", "train.eval_batch_size",
                      "train.num_epochs")

# Fields added after runs were written: an old config.json without them gets the value that
# reproduces how that run was made (the model before the upstream-convention switches had no
# block-output dropout, LayerNorm epsilon 1e-6 and Flax initialisation).
_ADDED_FIELDS = {
    "model.score_scale": 1.0, "model.item_init_std": 1.0,
    "model.mask_padding_queries": False, "model.block_output_dropout": False,
    "model.layer_norm_eps": 1e-6, "model.init": "flax", "model.attention_key_bias": False,
    "model.loss_padding_column": False, "train.selection": "metric", "train.valid_users": 0,
    "train.valid_steps": 0, "train.lr_schedule": "step", "train.warmup_epochs": 0.0,
}


class WorkdirError(Exception):
  """A workdir that cannot be used as asked, in one sentence for people."""


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for name, value in tree.items():
    key = f"{prefix}{name}"
    if isinstance(value, dict):
      flat.update(_flatten(value, key + "."))
    else:
      flat[key] = list(value) if isinstance(value, tuple) else value
  return flat


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no config.json: it is not a diffurec-jax workdir "
                       "(train one with bin/train.py --workdir).")
  return ml_collections.ConfigDict(_read_config_json(path))


def _read_config_json(path: str) -> dict:
  """config.json as a dict, with fields added since it was written at their defaults."""
  with open(path) as f:
    payload = json.load(f)
  for field, default in _ADDED_FIELDS.items():
    section, name = field.split(".")
    payload.setdefault(section, {}).setdefault(name, default)
  return payload


def check_or_write_config(workdir: str, config, write: bool):
  """Writes config.json, or checks that an existing one describes the same run."""
  path = os.path.join(workdir, "config.json")
  new = _flatten(config_dict(config))
  if os.path.exists(path):
    old = _flatten(_read_config_json(path))
    differ = sorted(k for k in set(old) | set(new)
                    if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
    if differ:
      shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
      raise WorkdirError(f"{workdir} holds a run with a different config ({shown}); "
                         "use a new --workdir or the original config.")
  if write:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(config_dict(config), f, indent=2, sort_keys=True)


class MetricsLog:
  """Appends one JSON object per line to metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def write(self, **record):
    if not self.enabled:
      return
    record.setdefault("time", round(time.time(), 3))
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


def save_id_map(workdir: str, dataset):
  np.savez(os.path.join(workdir, "id_map.npz"), user_ids=dataset.user_ids.astype(str),
           item_ids=dataset.item_ids.astype(str))


def load_id_map(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  path = os.path.join(workdir, "id_map.npz")
  if not os.path.exists(path):
    raise WorkdirError(f"{path} is missing; the workdir is incomplete (rerun bin/train.py).")
  with np.load(path, allow_pickle=False) as saved:
    return saved["user_ids"], saved["item_ids"]


def write_json(workdir: str, name: str, payload: dict):
  path = os.path.join(workdir, name)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def read_json(workdir: str, name: str) -> dict | None:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
