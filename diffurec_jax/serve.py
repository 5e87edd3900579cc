"""Serving a trained workdir: top-K recommendations in original ids.

`recommend(evaluate.load(workdir), ...)` scores histories given in ORIGINAL item ids: unknown items are skipped
(and counted), users left with no known item get an error row instead of stopping the batch.
History items are not recommended again unless `exclude_history=False`.
Output columns: user, rank, item, score, error (error is empty except on a user's single
error row). Input files: CSV/TSV/parquet with columns user, item[, timestamp] (sorted by time
per user, ties in file order), or JSONL lines {"user": ..., "items": [...]} (already in order).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diffurec_jax import catalog
from diffurec_jax import errors
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax import samplers
from diffurec_jax import sharding
from diffurec_jax.data import batches as batches_lib
from diffurec_jax.data import splits
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.training import checkpoints as checkpoint_lib
from diffurec_jax.training import workdir as workdir_lib


class InputError(errors.UserError):
  """A bad --input file, in one sentence for people."""


def read_histories(path: str) -> tuple[list[str], list[list[str]]]:
  """(users, item sequences) from a CSV/TSV/parquet long file or a JSONL file."""
  if not os.path.exists(path):
    raise InputError(f"Input file {path} does not exist.")
  if os.path.getsize(path) == 0:
    raise InputError(f"Input file {path} holds no interactions (it is empty).")
  if path.endswith((".jsonl", ".json")):
    users, sequences = [], []
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          users.append(str(row["user"]))
          sequences.append([str(item) for item in row["items"]])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
          raise InputError(f"{path} line {number} is not a JSON object with 'user' and "
                           f"'items' ({error}).") from error
  else:
    if path.endswith(".parquet"):
      frame = pl.read_parquet(path)
    else:
      frame = pl.read_csv(path, separator="\t" if path.endswith((".tsv", ".tab")) else ",",
                          infer_schema=False)
    missing = {"user", "item"} - set(frame.columns)
    if missing:
      raise InputError(f"{path} lacks column(s) {sorted(missing)}; found {frame.columns} "
                       "(expected user, item[, timestamp]).")
    frame = frame.with_row_index("_row")
    order = ["user", "timestamp", "_row"] if "timestamp" in frame.columns else ["user", "_row"]
    if "timestamp" in frame.columns:
      frame = frame.with_columns(pl.col("timestamp").cast(pl.Float64, strict=False))
    frame = frame.with_columns(pl.col("_row").min().over("user").alias("_first"))
    frame = frame.sort(["_first"] + order, maintain_order=True)
    grouped = frame.group_by("user", maintain_order=True).agg(
        pl.col("item").cast(pl.String))
    users = grouped["user"].cast(pl.String).to_list()
    sequences = grouped["item"].to_list()
  if not users:
    raise InputError(f"Input file {path} holds no interactions.")
  return users, sequences


OUTPUT_FORMATS = (".csv", ".tsv", ".tab", ".parquet")


def check_arguments(workdir: str, *, input_path: str | None, output: str | None, topk: int,
                    seeds: int, steps: int, batch_size: int):
  """Every bin/infer.py flag, before anything is loaded: InputError naming the flag."""
  if input_path and not output:
    raise InputError("--input needs --output (a .csv, .tsv or .parquet path).")
  if output:
    if not output.endswith(OUTPUT_FORMATS):
      raise InputError(f"--output {output} has no known format; end it in "
                       f"{', '.join(OUTPUT_FORMATS)} (.tab is tab-separated too).")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
      raise InputError(f"--output {output}: the folder {folder} does not exist; create it or "
                       "write elsewhere.")
    if not os.access(folder, os.W_OK):
      raise InputError(f"--output {output}: the folder {folder} is not writable.")
  if input_path:
    check_topk(topk, max(topk, 1))
  if seeds < 0:
    raise InputError(f"--seeds {seeds}: use 1 or more chains, or 0 for the run's own "
                     "(sample.seeds).")
  if batch_size < 1:
    raise InputError(f"--batch_size {batch_size}: use 1 or more users per batch (default 256).")
  if steps < 0:
    raise InputError(f"--steps {steps}: use 1 or more reverse steps, or 0 for the run's own.")
  if steps:
    config = workdir_lib.load_config(workdir)
    if steps > config.model.diffusion_steps:
      raise InputError(f"--steps {steps} is more than the {config.model.diffusion_steps} "
                       f"diffusion steps {workdir} was trained with; use --steps "
                       f"{config.model.diffusion_steps} or fewer.")


def unfinished_note(workdir: str) -> str | None:
  """A warning when `workdir` never finished (stopped, interrupted, or diverged), else None."""
  if workdir_lib.read_json(workdir, "results.json") is not None:
    return None
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  try:
    best, latest = checkpoints.best.latest_step(), checkpoints.latest.latest_step()
  finally:
    checkpoints.close()
  if best is None:
    return None  # evaluate.load says there is nothing to use.
  return (f"warning: {workdir} has not finished (no results.json; trained through epoch "
          f"{latest}): using its best checkpoint so far, epoch {best}.")


def check_topk(topk: int, num_items: int):
  """--topk must be in [1, number of items]: one sentence otherwise."""
  if topk < 1:
    raise InputError(f"--topk {topk} asks for no recommendations; use --topk 1 or more "
                     "(default 10).")
  if topk > num_items:
    raise InputError(f"--topk {topk} is more than the {num_items} items the model knows; use "
                     f"--topk {num_items} or fewer.")


def top_items_function(config, candidates: int):
  """(bundle, batch, key, schedule) -> (log probs [B, candidates], item ids [B, candidates]),
  best first; the padding item never appears. Blockwise (catalog.py) when catalog.block or
  catalog.shards asks for it: no [B, N+1] scores."""
  block = catalog.block_size(config.catalog.block, config.catalog.shards)
  if block:
    queries = samplers.make_queries(config)

    def blockwise(bundle, batch, key, schedule):
      x = queries(bundle, batch["history"], batch["users"], key, schedule)
      model = bundle_lib.merge(bundle)
      spec = catalog.Spec(model.num_items, block, getattr(model, "score_scale", 1.0))
      return catalog.top_k(x, model_lib.item_table(bundle), spec, candidates)

    return blockwise
  scorer = samplers.make_scorer(config)

  def dense(bundle, batch, key, schedule):
    log_probs = scorer(bundle, batch["history"], batch["users"], key, schedule)
    log_probs = log_probs.at[:, 0].set(-jnp.inf)  # The padding item is never recommended.
    return jax.lax.top_k(log_probs, candidates)

  return dense


def recommend(loaded: evaluate_lib.Loaded, users: list[str], sequences: list[list[str]], *, topk: int,
              batch_size: int = 256, progress: bool = True,
              exclude_history: bool = True) -> tuple[pl.DataFrame, dict]:
  """Top-K per user as a frame (user, rank, item, score, error) and counts of what was skipped.

  exclude_history: never recommend an item of the user's own (whole) history; a user then
  gets fewer than K rows only if fewer than K items are left.
  """
  config = loaded.config
  max_len = config.data.max_len
  num_items = len(loaded.item_ids) - 1
  check_topk(topk, num_items)
  lookup = {item: index for index, item in enumerate(loaded.item_ids) if index > 0}
  user_lookup = {user: index for index, user in enumerate(loaded.user_ids)}
  encoded = [[lookup.get(item, 0) for item in sequence] for sequence in sequences]
  unknown = sum(sum(1 for i in seq if i == 0) for seq in encoded)
  encoded = [np.asarray([i for i in seq if i > 0], dtype=np.int32) for seq in encoded]
  rows_ok = [k for k, seq in enumerate(encoded) if len(seq)]
  # Enough candidates that K remain after dropping the history's items on the host.
  longest = max((len(np.unique(seq)) for seq in encoded), default=0)
  candidates = min(topk + longest, num_items) if exclude_history else topk
  flat = np.concatenate([encoded[k] for k in rows_ok]) if rows_ok else np.zeros(0, np.int32)
  lengths = np.asarray([len(encoded[k]) for k in rows_ok], dtype=np.int64)
  ends = np.cumsum(lengths)
  examples = splits.Examples(
      users=np.asarray([user_lookup.get(users[k], k) for k in rows_ok], dtype=np.int32),
      starts=ends - lengths, ends=ends, targets=np.zeros(len(rows_ok), np.int32))
  mesh = sharding.make_mesh(config.catalog.shards) if config.catalog.shards > 1 else None
  top_items = jax.jit(top_items_function(config, candidates))
  bundle = loaded.bundle
  if mesh is not None:  # The item table's rows on their devices; batches over 'data'.
    sharding.check_batch_size(batch_size, mesh, "batch_size")
    top_items = sharding.under_mesh(top_items, mesh)
    bundle = evaluate_lib.place(bundle, mesh)
  schedule = samplers.sampling_schedule(config)
  key = jax.random.key(config.sample.seed)
  lengths_bucket = batches_lib.padded_lengths(config)
  plans = batches_lib.eval_plan(np.minimum(lengths, max_len), batch_size, lengths_bucket)
  scores = np.zeros((len(rows_ok), candidates), np.float32)
  items = np.zeros((len(rows_ok), candidates), np.int64)
  for plan in tqdm(plans, desc="recommend", disable=not progress, leave=False):
    batch = batches_lib.build(plan, examples, flat)
    if mesh is not None:
      batch = sharding.shard_batch(batch, mesh)
    values, indices = jax.device_get(top_items(bundle, batch, key, schedule))
    valid = plan.indices >= 0
    scores[plan.indices[valid]] = values[valid]
    items[plan.indices[valid]] = indices[valid]
  records = {"user": [], "rank": [], "item": [], "score": [], "error": []}
  position = {k: n for n, k in enumerate(rows_ok)}
  for k, user in enumerate(users):
    if k not in position:
      _append(records, user, None, None, None, "no known item in history")
      continue
    row = position[k]
    seen = set(encoded[k].tolist()) if exclude_history else set()
    picked = [c for c in range(candidates)
              if items[row, c] not in seen and np.isfinite(scores[row, c])][:topk]
    for rank, column in enumerate(picked):
      _append(records, user, rank + 1, str(loaded.item_ids[items[row, column]]),
              float(np.exp(scores[row, column])), None)
  counts = {"users": len(users), "users_without_known_items": len(users) - len(rows_ok),
            "unknown_items_skipped": unknown}
  return pl.DataFrame(records, schema={"user": pl.String, "rank": pl.Int64, "item": pl.String,
                                       "score": pl.Float64, "error": pl.String}), counts


def _append(records, user, rank, item, score, error):
  for name, value in zip(("user", "rank", "item", "score", "error"),
                         (user, rank, item, score, error)):
    records[name].append(value)


def write_recommendations(frame: pl.DataFrame, path: str):
  if path.endswith(".parquet"):
    frame.write_parquet(path)
  else:
    frame.write_csv(path, separator="\t" if path.endswith((".tsv", ".tab")) else ",")
