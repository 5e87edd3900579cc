"""Transforms: filter, order and remap an interaction frame (polars).

Each function takes and returns a polars DataFrame with columns `user`, `item`,
optional `time`/`rating`, plus the bookkeeping columns added by `add_file_order`:
`row` (position in the file) and `first_row` (the user's first row in the file).
They are pure; `pipeline.py` chains them in this order:

  add_file_order -> filter_rating -> sort_chronologically -> deduplicate -> k_core
  -> drop_short_users -> keep_first_users -> remap

and raises DataError when a step leaves nothing.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from absl import logging

from diffurec_jax.data.errors import DataError

MIN_SEQUENCE_LENGTH = 3  # Leave-one-out needs a train item, a valid item and a test item.
DEDUP_MODES = ("none", "first", "last")
SHORT_USER_MODES = ("drop", "error")


def add_file_order(frame: pl.DataFrame) -> pl.DataFrame:
  """Adds `row` (file position) and `first_row` (the user's first file position)."""
  frame = frame.with_row_index("row")
  return frame.with_columns(first_row=pl.col("row").min().over("user"))


def filter_rating(frame: pl.DataFrame, min_rating: float, source: str) -> pl.DataFrame:
  """Keeps interactions rated >= min_rating; a negative min_rating keeps all."""
  if min_rating < 0:
    return frame
  if "rating" not in frame.columns:
    raise DataError(
        f"--config.data.min_rating={min_rating} needs ratings but {source} has none; set "
        "--config.data.min_rating=-1 or name the column with --config.data.rating_col.")
  return frame.filter(pl.col("rating") >= min_rating)


def sort_chronologically(frame: pl.DataFrame) -> pl.DataFrame:
  """Groups users in order of first appearance; each user's rows by time.

  Ties (rows of one user with equal times) are ordered by item id, compared as the
  readers' normalised id text (so '10' comes before '9'), then exact duplicates in
  file order: shuffling the rows of a file changes no user's sequence (only the
  numbering of users and items, which follows first appearance). Without a `time`
  column the file order is the chronological order; S3-Rec sequence files have their
  positions as times, so no ties.
  """
  keys = ["first_row", "time", "item", "row"] if "time" in frame.columns else ["first_row", "row"]
  return frame.sort(keys, maintain_order=True)


def count_time_ties(frame: pl.DataFrame) -> tuple[int, int]:
  """(users, interactions) of rows sharing their user's time with another row; (0, 0) if no time."""
  if "time" not in frame.columns:
    return 0, 0
  tied = frame.filter(pl.len().over(["user", "time"]) > 1)
  return tied["user"].n_unique(), len(tied)


def deduplicate(frame: pl.DataFrame, mode: str) -> pl.DataFrame:
  """Repeated (user, item) pairs: 'none' keeps all, 'first'/'last' keep the earliest/latest.

  Earliest and latest are in the frame's (chronological) order.
  """
  if mode == "none":
    return frame
  return frame.unique(subset=["user", "item"], keep=mode, maintain_order=True)


def k_core(frame: pl.DataFrame, user_core: int, item_core: int) -> tuple[pl.DataFrame, int]:
  """Iterative k-core: drops users with < user_core and items with < item_core rows.

  Repeats until nothing changes (the result is the unique maximal k-core, whatever
  the order of the passes); 0 switches a side off. Returns (frame, passes).
  """
  passes = 0
  while True:
    size = len(frame)
    if user_core > 0:
      frame = frame.filter(pl.len().over("user") >= user_core)
    if item_core > 0:
      frame = frame.filter(pl.len().over("item") >= item_core)
    passes += 1
    if len(frame) == size or not len(frame):
      return frame, passes


def count_short_users(frame: pl.DataFrame, min_length: int = MIN_SEQUENCE_LENGTH) -> int:
  """Number of users with fewer than min_length interactions."""
  lengths = frame.group_by("user").len()
  return int((lengths["len"] < min_length).sum())


def drop_short_users(frame: pl.DataFrame, mode: str, user_core: int, item_core: int,
                     source: str) -> pl.DataFrame:
  """Users with < 3 interactions: 'drop' them (logged), or 'error' with a DataError.

  Dropping re-runs the k-core so that the item threshold still holds afterwards.
  """
  short = count_short_users(frame)
  if not short:
    return frame
  if mode == "error":
    raise DataError(
        f"{short} user(s) in {source} have fewer than {MIN_SEQUENCE_LENGTH} interactions after "
        "filtering and cannot be split leave-one-out; set --config.data.short_users=drop to "
        "drop them (or raise --config.data.user_core).")
  users_before = frame["user"].n_unique()
  frame, _ = k_core(frame, max(user_core, MIN_SEQUENCE_LENGTH), item_core)
  logging.info("Dropped %d user(s) with fewer than %d interactions (%d users in all after "
               "re-filtering items).", short, MIN_SEQUENCE_LENGTH,
               users_before - frame["user"].n_unique())
  return frame


def keep_first_users(frame: pl.DataFrame, max_users: int) -> pl.DataFrame:
  """Keeps the first max_users users in order of first appearance in the file (0 = all)."""
  if max_users <= 0:
    return frame
  first_rows = frame["first_row"].unique().sort()
  if len(first_rows) <= max_users:
    return frame
  return frame.filter(pl.col("first_row") <= first_rows[max_users - 1])


def remap(frame: pl.DataFrame) -> dict[str, np.ndarray]:
  """Remaps a sorted frame to contiguous ids.

  Users become 0..U-1 and items 1..N (0 = padding), both in order of first
  appearance in the sorted frame. Returns numpy arrays:
    items: [num_interactions] int32, offsets: [U + 1] int64,
    user_ids: [U] str, item_ids: [N + 1] str with item_ids[0] = ''.
  """
  user_ids = frame["user"].unique(maintain_order=True)
  item_ids = frame["item"].unique(maintain_order=True)
  items = frame["item"].replace_strict(
      item_ids, pl.int_range(1, len(item_ids) + 1, eager=True), return_dtype=pl.Int32)
  lengths = frame.group_by("user", maintain_order=True).len()["len"].to_numpy()
  assert len(lengths) == len(user_ids), "users must be contiguous after sorting"
  offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  return {
      "items": items.to_numpy().astype(np.int32),
      "offsets": offsets,
      "user_ids": np.asarray(user_ids.to_list(), dtype=str),
      "item_ids": np.asarray([""] + item_ids.to_list(), dtype=str),
  }
