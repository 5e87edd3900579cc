"""A workdir owns a run: config.json, metrics.jsonl, id_map.npz, checkpoints/, results.json.

Only process 0 writes. A rerun with the same config resumes; a different config in a workdir
that holds a checkpoint is refused (naming the fields that differ) so two runs never mix; one
where nothing was trained takes the new config. A finished run is never written to, and a
lock keeps a second process out of a live workdir.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from diffurec_jax import errors

# Fields that may change between a run and its resumption: where data lives, evaluation batch
# size (results are per-user keyed, so identical), micro-batching (the same update, in less
# memory; only the random draws are split differently), and num_epochs (to extend a run, or to end
# it at its last checkpoint: the best-on-validation checkpoint is then tested).
RESUMABLE_CHANGES = ("data.root", "data.cache_dir", "data.download", "train.eval_batch_size",
                     "train.num_epochs", "train.microbatch_tokens",
                     # The learning-rate schedule and gradient clipping hold no optimizer state:
                     # a run that diverged resumes from its last good checkpoint with new ones.
                     "train.learning_rate", "train.grad_clip", "train.warmup_epochs",
                     "train.lr_schedule", "train.lr_decay_epochs", "train.lr_decay_rate",
                     # Blockwise scoring computes the same softmax and ranks in less memory.
                     "catalog.block")

# Fields removed since runs were written: read by nothing, so dropping them changes no run.
_REMOVED_FIELDS = ("sample.topk", "sample.compute_dtype")

# Fields added after runs were written: an old config.json without them gets the value that
# reproduces how that run was made (the model before the upstream-convention switches had no
# block-output dropout, LayerNorm epsilon 1e-6 and Flax initialisation).
_ADDED_FIELDS = {
    "model.score_scale": 1.0, "model.item_init_std": 1.0,
    "model.mask_padding_queries": False, "model.block_output_dropout": False,
    "model.layer_norm_eps": 1e-6, "model.init": "flax", "model.attention_key_bias": False,
    "model.loss_padding_column": False, "train.selection": "metric", "train.valid_users": 0,
    "train.valid_steps": 0, "train.lr_schedule": "step", "train.warmup_epochs": 0.0,
    "model.cross_attention_form": "dot_product", "model.share_cross_attention_norm": False,
    "model.cross_fill_padding_queries": False, "model.every_block_reads_input": False,
    "train.microbatch_tokens": 0, "data.missing_ids": "error",
    "catalog.block": 0, "catalog.shards": 1, "catalog.loss": "full", "catalog.negatives": 1024,
    "catalog.negative_sampler": "uniform",
    "data.synthetic_items": 10_000, "data.synthetic_users": 0, "data.synthetic_signal": 0.5,
    "data.synthetic_zipf": 1.0, "data.synthetic_seed": 0,
}


class WorkdirError(errors.UserError):
  """A workdir that cannot be used as asked, in one sentence for people."""


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'model.hidden': 128, ...} of a nested dict; tuples become lists (as in JSON)."""
  flat = {}
  for name, value in tree.items():
    key = f"{prefix}{name}"
    if isinstance(value, dict):
      flat.update(flatten(value, key + "."))
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
  """config.json as a dict: fields added since it was written at their defaults, fields
  removed since (they changed nothing) dropped."""
  with open(path) as f:
    payload = json.load(f)
  for field in _REMOVED_FIELDS:
    section, name = field.split(".")
    payload.get(section, {}).pop(name, None)
  for field, default in _ADDED_FIELDS.items():
    section, name = field.split(".")
    payload.setdefault(section, {}).setdefault(name, default)
  return payload


def has_checkpoint(workdir: str) -> bool:
  """Whether anything was trained here: a checkpoint (latest, best, interrupted) or results."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return True
  for which in ("latest", "best", "interrupted"):
    directory = os.path.join(workdir, "checkpoints", which)
    if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
      return True
  return False


def _differences(workdir: str, config) -> list[str]:
  path = os.path.join(workdir, "config.json")
  new = flatten(config_dict(config))
  old = flatten(_read_config_json(path))
  differ = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ]


def check_config(workdir: str, config):
  """Refuses a config that differs from the workdir's config.json (writes nothing)."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return
  differ = _differences(workdir, config)
  if differ:
    raise WorkdirError(f"{workdir} holds a run with a different config "
                       f"({', '.join(differ[:5])}); use a new --workdir or the original config.")


def resumable_changes(workdir: str, config) -> dict:
  """{field: [old, new]} of the RESUMABLE_CHANGES fields `config` changes in config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  new, old = flatten(config_dict(config)), flatten(_read_config_json(path))
  return {k: [old.get(k), new.get(k)] for k in RESUMABLE_CHANGES if old.get(k) != new.get(k)}


def check_or_write_config(workdir: str, config, write: bool) -> str:
  """Writes config.json, or checks that an existing one describes the same run.

  Returns 'new', 'same', 'changed' or 'replaced': a workdir where nothing was trained (no
  checkpoint, e.g. a run that stopped on a data error) takes the new config; one with a
  checkpoint refuses it unless only RESUMABLE_CHANGES fields differ ('changed': config.json
  then records the new values). An unchanged config.json is not rewritten.
  """
  path = os.path.join(workdir, "config.json")
  status = "new"
  if os.path.exists(path):
    differ = _differences(workdir, config)
    if not differ:
      status = "changed" if resumable_changes(workdir, config) else "same"
    elif has_checkpoint(workdir):
      raise WorkdirError(f"{workdir} holds a run with a different config "
                         f"({', '.join(differ[:5])}); use a new --workdir or the original config.")
    else:
      status = "replaced"
      if write:
        print(f"{workdir} had no checkpoint: replaced its config.json "
              f"({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}).")
  if write and status != "same":
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(config_dict(config), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  return status


def check_writable(workdir: str):
  """A workdir that training must write to: creatable and writable, else one sentence."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise WorkdirError(f"Cannot create the workdir {workdir} ({error.strerror}); choose a "
                       "--workdir you can write to.") from error
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"The workdir {workdir} is not writable, and this run is not finished; "
                       "make it writable (chmod u+w) or copy it to a --workdir you can write to.")


class Lock:
  """An exclusive lock on `workdir/.lock` held while a process trains there.

  flock(2): the kernel drops it when the process dies, even by kill -9, so it never sticks.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = None

  def __enter__(self):
    try:
      import fcntl
    except ImportError:  # Not POSIX: no lock.
      return self
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      self._file.seek(0)
      owner = self._file.read().strip() or "unknown"
      self._file.close()
      self._file = None
      raise WorkdirError(
          f"{os.path.dirname(self.path)} is in use by another training process (pid {owner}); "
          "wait for it to finish, stop it, or use another --workdir.") from error
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      self._file.close()  # Closing releases the flock.
      self._file = None
    return False


class MetricsLog:
  """Appends one JSON object per line to metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool, listeners=()):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.listeners = listeners  # Called with each record written (e.g. TensorBoard).

  def write(self, **record):
    if not self.enabled:
      return
    record.setdefault("time", round(time.time(), 3))
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    for listener in self.listeners:
      listener(record)

  def keep_only(self, keep):
    """Rewrites metrics.jsonl with the records for which keep(record) is true.

    On a resume, records written after the checkpoint (a kill between logging and saving)
    would otherwise appear twice.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    records = self.read()
    kept = [r for r in records if keep(r)]
    if len(kept) == len(records):
      return
    with open(self.path + ".tmp", "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    os.replace(self.path + ".tmp", self.path)

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
