"""Full-ranking evaluation of a split: fixed-shape padded batches, sums on device.

Every user is scored against all items (padding excluded), ranks are pessimistic on ties,
HR/NDCG/MRR@K are averaged over users (sums and counts, divided once on the host). One
compiled function per bucket length; the noise of each user's chain is keyed by the user id,
so results do not depend on batch size, bucketing or device count.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from tqdm.auto import tqdm

from diffurec_jax.data import batches as batches_lib
from diffurec_jax import metrics
from diffurec_jax import samplers as sample
from diffurec_jax import sharding
from diffurec_jax.data import splits


def make_eval_step(config):
  """jit(bundle, batch, key, schedule) -> (metric sums, ranks [B], log_probs top-k)."""
  scorer = sample.make_scorer(config)
  mask_history = config.train.mask_history

  def eval_step(bundle, batch, key, schedule):
    log_probs = scorer(bundle, batch["history"], batch["users"], key, schedule)
    history = batch["history"] if mask_history else None
    sums, ranks = metrics.evaluate_batch(log_probs, batch["targets"], batch["weights"], history)
    return sums, ranks

  return jax.jit(eval_step)


def user_subset(num_users: int, max_users: int, seed: int) -> np.ndarray | None:
  """A fixed random subset of `max_users` of `num_users` users, sorted (None = all users)."""
  if not max_users or max_users >= num_users:
    return None
  return np.sort(np.random.default_rng(seed).choice(num_users, max_users, replace=False))


def validation_config(config):
  """The config validation runs with: `train.valid_steps` reverse steps (0 = sample.steps)."""
  if not config.train.valid_steps:
    return config
  valid_config = config.copy_and_resolve_references()
  valid_config.sample.steps = config.train.valid_steps
  return valid_config


def evaluate_split(bundle, dataset, split: str, config, mesh, eval_step=None, *,
                   progress: bool = True, max_users: int = 0) -> tuple[dict, dict]:
  """Metrics of `split` ('valid' | 'test') and per-user arrays (users, ranks, lengths).

  `max_users` > 0 evaluates a fixed random subset of that many users (seeded by
  sample.seed, the same subset every time); the test split always uses every user.
  """
  eval_step = eval_step or make_eval_step(config)
  schedule = sample.sampling_schedule(config)
  examples = splits.eval_examples(dataset, split)
  subset = user_subset(len(examples.users), max_users, config.sample.seed)
  if subset is not None:
    examples = examples.take(subset)
  lengths = batches_lib.bucket_lengths(config.data.max_len, bucket_config(config))
  history_lengths = (examples.ends - examples.starts).astype(np.int64)
  plans = batches_lib.eval_plan(history_lengths, config.train.eval_batch_size, lengths)
  key = jax.random.key(config.sample.seed)
  totals = {}
  ranks = np.zeros(len(history_lengths), dtype=np.int64)
  start = time.time()
  for plan in tqdm(plans, desc=split, disable=not progress, leave=False):
    batch = batches_lib.build(plan, examples, dataset.items)
    sums, batch_ranks = eval_step(bundle, sharding.shard_batch(batch, mesh), key, schedule)
    totals = metrics.accumulate(totals, jax.device_get(sums))
    valid = plan.indices >= 0
    ranks[plan.indices[valid]] = np.asarray(jax.device_get(batch_ranks))[valid]
  result = metrics.finalize(totals)
  result["seconds"] = round(time.time() - start, 3)
  per_user = {"users": examples.users, "targets": examples.targets, "ranks": ranks,
              "history_lengths": history_lengths}
  return result, per_user


def bucket_config(config):
  """Length buckets are exact only when padding keys are masked and padding queries are not
  (a padding query reads every position); otherwise pad to max_len."""
  exact = config.model.mask_padding_keys and not config.model.mask_padding_queries
  return tuple(config.train.length_buckets) if exact else ()
