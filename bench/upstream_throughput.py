"""The official PyTorch DiffuRec's training and inference speed on our data and shapes.

  python bench/upstream_throughput.py --upstream PATH/TO/DiffuRec/src --part train|infer
      [--config configs/beauty.py:diffurec] [--steps 10] [--users 256] [--eval_batch_size 256]
      [--threads 2] [--json]

Loads the official modules from --upstream (read-only; torch is the optional `parity` extra,
never a CI dependency) and times, on the same prepared dataset our bench reads:
  train: the official training step (forward with train_flag=True, loss_diffu_ce, backward,
         torch Adam step) on shuffled real training examples, every history left-padded to
         max_len as the official data loader does; examples/s over --steps steps after 2
         warm-up steps.
  infer: the official inference (forward with train_flag=False: the 32-step reverse chain,
         then diffu_rep_pre: scores over all items, and the top-20 of each user), on random
         test users in batches of --eval_batch_size; users/s after one warm-up batch.
Peak RSS is this process's high-water mark (run train and infer in separate processes, as
bench/throughput.py --upstream does). The last line is JSON.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffurec_jax import data as data_lib
from diffurec_jax.data import splits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from upstream_code import import_upstream, upstream_args  # noqa: E402  (bench/)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/beauty.py:diffurec", "Config.")
_UPSTREAM = flags.DEFINE_string("upstream", None, "Folder of the official diffurec.py/model.py.")
_PART = flags.DEFINE_enum("part", "train", ["train", "infer"], "What to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed training steps.")
_USERS = flags.DEFINE_integer("users", 256, "Timed test users.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 256, "Users per inference batch.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads (0 = torch's default).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the batches and the weights.")
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON line.")


def padded(examples: splits.Examples, items: np.ndarray, rows: np.ndarray, max_len: int):
  """(histories [B, max_len] left-padded as the official loader, targets [B]) int64."""
  history = splits.gather_histories(items, examples.starts[rows], examples.ends[rows], max_len)
  return history.astype(np.int64), examples.targets[rows].astype(np.int64)


def official_model(config, num_items: int, upstream: str):
  upstream_diffurec, upstream_model = import_upstream(upstream)
  args = upstream_args(config, num_items)
  return upstream_model.Att_Diffuse_model(upstream_diffurec.DiffuRec(args), args)


def time_train(model, dataset, config, steps: int, seed: int) -> dict:
  import torch
  examples = splits.training_examples(dataset)
  rng = np.random.default_rng(seed)
  batch = config.train.batch_size
  optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate,
                               weight_decay=config.train.weight_decay)
  model.train()

  def step():
    rows = rng.choice(len(examples), batch, replace=False)
    history, targets = padded(examples, dataset.items, rows, config.data.max_len)
    history, targets = torch.from_numpy(history), torch.from_numpy(targets)[:, None]
    optimizer.zero_grad()
    _, rep_diffu, *_ = model(history, targets, train_flag=True)
    loss = model.loss_diffu_ce(rep_diffu, targets)
    loss.backward()
    optimizer.step()
    return float(loss)

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  seconds = time.perf_counter() - start
  return {"train_examples_per_s": round(steps * batch / seconds, 1), "train_steps": steps}


def time_infer(model, dataset, config, num_users: int, eval_batch: int, seed: int) -> dict:
  import torch
  examples = splits.eval_examples(dataset, "test")
  users = np.sort(np.random.default_rng(seed).choice(len(examples), num_users, replace=False))
  model.eval()

  def run(rows):
    history, targets = padded(examples, dataset.items, rows, config.data.max_len)
    history, targets = torch.from_numpy(history), torch.from_numpy(targets)[:, None]
    with torch.no_grad():
      _, rep_diffu, *_ = model(history, targets, train_flag=False)
      scores = model.diffu_rep_pre(rep_diffu)
      return torch.topk(scores, k=20).indices

  run(users[:eval_batch])  # Warm-up.
  start = time.perf_counter()
  for first in range(0, num_users, eval_batch):
    run(users[first:first + eval_batch])
  seconds = time.perf_counter() - start
  return {"infer_users_per_s": round(num_users / seconds, 1), "infer_users": num_users}


def main(argv):
  del argv
  if not _UPSTREAM.value:
    sys.exit("error: --upstream PATH is required (the folder of the official diffurec.py).")
  config = _CONFIG.value
  if config.variant != "diffurec":
    sys.exit(f"error: the official code is DiffuRec only; got variant {config.variant!r}.")
  import torch
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  torch.manual_seed(_SEED.value)
  dataset = data_lib.prepare(config.data)
  model = official_model(config, dataset.num_items, _UPSTREAM.value)
  result = {"code": "official", "part": _PART.value, "dataset": config.data.name,
            "batch_size": config.train.batch_size, "max_len": config.data.max_len,
            "eval_batch_size": _EVAL_BATCH.value, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
  if _PART.value == "train":
    result.update(time_train(model, dataset, config, _STEPS.value, _SEED.value))
  else:
    result.update(time_infer(model, dataset, config, _USERS.value, _EVAL_BATCH.value,
                             _SEED.value))
  result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  if not _JSON.value:
    for key, value in result.items():
      print(f"{key:<20}  {value}")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
