"""Leave-one-out splits and fixed-length histories, as index arrays (numpy).

For a user's sequence `seq` of length n >= 3: test = seq[-1] (history seq[:-1]),
valid = seq[-2] (history seq[:-2]), and the training part is seq[:-2]; training
examples are all its prefixes with at least one history item (targets seq[1..n-3]),
as DiffuRec does. Examples are index ranges into `Dataset.items`, so nothing is
copied until `gather_histories` builds a padded batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from diffurec_jax.data.pipeline import Dataset

SPLITS = ("valid", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """Parallel arrays, one entry per example.

  users: [N] int32 user index; starts, ends: [N] int64, the history of example k
  is items[starts[k]:ends[k]]; targets: [N] int32, == items[ends[k]].
  """
  users: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  targets: np.ndarray

  def __len__(self) -> int:
    return len(self.users)

  def take(self, index) -> Examples:
    """The examples at `index` (an int array, slice or boolean mask)."""
    return Examples(self.users[index], self.starts[index], self.ends[index], self.targets[index])


def _lengths(offsets: np.ndarray) -> np.ndarray:
  return np.diff(offsets)


def training_examples(ds: Dataset) -> Examples:
  """Every prefix of each user's training part seq[:-2] with >= 1 history item.

  User u with n items contributes n - 3 examples (targets seq[1..n-3]), in user
  order, then by position.
  """
  counts = np.maximum(_lengths(ds.offsets) - 3, 0)
  total = int(counts.sum())
  users = np.repeat(np.arange(ds.num_users, dtype=np.int32), counts)
  starts = np.repeat(ds.offsets[:-1], counts).astype(np.int64)
  # Position of each example within its user: 0..counts[u]-1.
  first_of_user = np.repeat(np.cumsum(counts) - counts, counts)
  ends = starts + 1 + (np.arange(total, dtype=np.int64) - first_of_user)
  return Examples(users, starts, ends, ds.items[ends].astype(np.int32))


def eval_examples(ds: Dataset, split: str) -> Examples:
  """One example per user, in user order: 'valid' targets seq[-2], 'test' seq[-1].

  The history is everything before the target (seq[:-2] or seq[:-1]).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  starts = ds.offsets[:-1].astype(np.int64)
  ends = ds.offsets[1:].astype(np.int64) - (2 if split == "valid" else 1)
  users = np.arange(ds.num_users, dtype=np.int32)
  return Examples(users, starts, ends, ds.items[ends].astype(np.int32))


def gather_histories(items: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                     length: int) -> np.ndarray:
  """The most recent `length` items of each history items[starts[b]:ends[b]].

  Args:
    items: [num_interactions] int item ids.
    starts, ends: [B] int history ranges.
    length: L, the padded history length.
  Returns:
    [B, L] int32, left-padded with 0: the last column is the most recent item.
  """
  starts = np.asarray(starts, dtype=np.int64)
  ends = np.asarray(ends, dtype=np.int64)
  positions = ends[:, None] - length + np.arange(length, dtype=np.int64)[None, :]
  valid = positions >= starts[:, None]
  values = np.asarray(items)[np.where(valid, positions, 0)] if len(items) else 0
  return np.where(valid, values, 0).astype(np.int32)


def training_item_counts(ds: Dataset) -> np.ndarray:
  """[num_items + 1] int64: interactions per item in the training parts seq[:-2]."""
  lengths = _lengths(ds.offsets)
  train_lengths = np.maximum(lengths - 2, 0)
  in_train = np.arange(len(ds.items)) - np.repeat(ds.offsets[:-1], lengths) < np.repeat(
      train_lengths, lengths)
  return np.bincount(ds.items[in_train], minlength=ds.num_items + 1).astype(np.int64)
