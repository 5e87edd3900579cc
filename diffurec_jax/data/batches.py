"""Fixed-shape batches: length buckets, padding rows with weight 0, deterministic order.

Most histories are far shorter than max_len (Beauty: 9 items on average against 50-100),
so examples are grouped into a few padded lengths (e.g. 8/16/32/max_len). With padding keys
masked and positions counted from the most recent item, the model's output does not depend
on the padded length, so buckets give the same numbers for far less compute; each bucket is
one compiled shape. The order of an epoch is a pure function of (seed, epoch), which is what
makes a resumed run identical to an uninterrupted one.

Batch arrays: history [B, L] int32, targets [B] int32, weights [B] float32, users [B] int32,
and for SASRec next_items [B, L] int32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffurec_jax.data import splits


@dataclasses.dataclass(frozen=True)
class Plan:
  """One batch to build: padded length, example indices (-1 = padding row)."""
  length: int
  indices: np.ndarray


def bucket_lengths(max_len: int, buckets) -> tuple[int, ...]:
  """Sorted padded lengths: the configured buckets below max_len, then max_len."""
  return tuple(sorted({b for b in buckets if 0 < b < max_len} | {max_len}))


def bucket_config(config) -> tuple[int, ...]:
  """Length buckets are exact only when padding keys are masked and padding queries are not
  (a padding query reads every position); otherwise pad to max_len."""
  exact = config.model.mask_padding_keys and not config.model.mask_padding_queries
  return tuple(config.train.length_buckets) if exact else ()


def padded_lengths(config) -> tuple[int, ...]:
  """The padded history lengths a run's batches take (training and evaluation alike)."""
  return bucket_lengths(config.data.max_len, bucket_config(config))


def assign_buckets(history_lengths: np.ndarray, lengths: tuple[int, ...]) -> np.ndarray:
  """Index of the smallest padded length that holds each history (capped at the last)."""
  return np.minimum(np.searchsorted(np.asarray(lengths), history_lengths, side="left"),
                    len(lengths) - 1)


def _chunks(indices: np.ndarray, batch_size: int, length: int) -> list[Plan]:
  plans = []
  for begin in range(0, len(indices), batch_size):
    chunk = indices[begin:begin + batch_size]
    padded = np.full(batch_size, -1, dtype=np.int64)
    padded[:len(chunk)] = chunk
    plans.append(Plan(length, padded))
  return plans


def epoch_plan(history_lengths, batch_size: int, lengths, seed: int, epoch: int,
               max_steps: int = 0) -> list[Plan]:
  """Shuffled training batches of one epoch, bucketed by history length."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(history_lengths))
  bucket_of = assign_buckets(history_lengths[order], lengths)
  plans = []
  for bucket, length in enumerate(lengths):
    plans.extend(_chunks(order[bucket_of == bucket], batch_size, length))
  plans = [plans[i] for i in rng.permutation(len(plans))]
  return plans[:max_steps] if max_steps else plans


def eval_plan(history_lengths, batch_size: int, lengths) -> list[Plan]:
  """Every example once, in order within buckets, padded to fixed batch shapes."""
  bucket_of = assign_buckets(history_lengths, lengths)
  plans = []
  for bucket, length in enumerate(lengths):
    plans.extend(_chunks(np.flatnonzero(bucket_of == bucket), batch_size, length))
  return plans


def build(plan: Plan, examples: splits.Examples, items: np.ndarray, *,
          next_items: bool = False) -> dict[str, np.ndarray]:
  """Materialises a Plan: padding rows repeat example 0 with weight 0."""
  valid = plan.indices >= 0
  index = np.where(valid, plan.indices, 0)
  starts, ends = examples.starts[index], examples.ends[index]
  batch = {
      "history": splits.gather_histories(items, starts, ends, plan.length),
      "targets": examples.targets[index].astype(np.int32),
      "users": examples.users[index].astype(np.int32),
      "weights": valid.astype(np.float32),
  }
  if next_items:
    batch["next_items"] = splits.gather_histories(items, starts + 1, ends + 1, plan.length)
  return batch


def sequence_examples(dataset) -> splits.Examples:
  """SASRec: one example per user, history = training part minus its last item.

  The next item of every history position is gathered with the same offsets shifted by one.
  Users whose training part has a single item have no next-item target and are skipped.
  """
  offsets = dataset.offsets
  starts = offsets[:-1]
  ends = offsets[1:] - 3  # Training part is seq[:-2]; its last item is only a target.
  keep = ends - starts >= 1
  users = np.flatnonzero(keep).astype(np.int32)
  return splits.Examples(users=users, starts=starts[keep], ends=ends[keep],
                         targets=dataset.items[ends[keep]].astype(np.int32))
