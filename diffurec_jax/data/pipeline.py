"""The prepared dataset, how it is built from a raw file, and its on-disk cache.

`prepare(config.data)` finds the raw file (registry), reads it (readers), filters,
orders and remaps it (transforms), and returns a `Dataset`: every user's
chronological item sequence, concatenated, with the id maps. Prepared datasets are
cached as .npz (no pickles) + .json, keyed by the config fields that change the
result and the raw file's path, size and mtime, so training never re-parses raw
files. The cache lives in config.data.cache_dir, else $DIFFUREC_CACHE, else
`~/.cache/diffurec_jax/prepared`; never next to the raw files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import tempfile

import numpy as np
from absl import logging

from diffurec_jax.data import columns, readers, registry, splits, transforms
from diffurec_jax.data.errors import DataError

CACHE_VERSION = 2  # Bump when the pipeline's output changes for the same config.
# Config fields that do not change the prepared data (the raw path is keyed instead of root;
# the synthetic log's file name encodes its parameters).
_NOT_IN_CACHE_KEY = ("cache_dir", "download", "max_len", "root", "synthetic_items",
                     "synthetic_users", "synthetic_signal", "synthetic_zipf", "synthetic_seed")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """All users' chronological item sequences, concatenated, and the id maps.

  items: [num_interactions] int32, item ids 1..num_items (0 = padding, unused).
  offsets: [num_users + 1] int64; user u's sequence is items[offsets[u]:offsets[u+1]].
  user_ids: [num_users] str, the original id of each user index.
  item_ids: [num_items + 1] str, the original id of each item index; item_ids[0] = ''.
  """
  name: str
  num_users: int
  num_items: int
  items: np.ndarray
  offsets: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray

  def __post_init__(self):
    set_field = functools.partial(object.__setattr__, self)
    set_field("num_users", int(self.num_users))
    set_field("num_items", int(self.num_items))
    set_field("items", np.asarray(self.items, dtype=np.int32))
    set_field("offsets", np.asarray(self.offsets, dtype=np.int64))
    set_field("user_ids", np.asarray(self.user_ids, dtype=str))
    set_field("item_ids", np.asarray(self.item_ids, dtype=str))
    assert self.offsets.shape == (self.num_users + 1,), (self.offsets.shape, self.num_users)
    assert self.user_ids.shape == (self.num_users,), (self.user_ids.shape, self.num_users)
    assert self.item_ids.shape == (self.num_items + 1,), (self.item_ids.shape, self.num_items)
    assert self.offsets[0] == 0 and self.offsets[-1] == len(self.items)

  @classmethod
  def from_sequences(cls, sequences, name: str = "toy", user_ids=None, item_ids=None) -> Dataset:
    """A dataset from lists of item ids 1..N; original ids default to str(index)."""
    lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]) if len(
        sequences) else np.zeros(0, np.int32)
    num_items = int(items.max()) if len(items) else 0
    if item_ids is None:
      item_ids = np.array([""] + [str(item) for item in range(1, num_items + 1)])
    return cls(
        name=name, num_users=len(sequences), num_items=num_items, items=items,
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        user_ids=np.arange(len(sequences)).astype(str) if user_ids is None else user_ids,
        item_ids=item_ids)

  @property
  def num_interactions(self) -> int:
    return len(self.items)

  def lengths(self) -> np.ndarray:
    """[num_users] int64 sequence lengths."""
    return np.diff(self.offsets)

  def sequence(self, user: int) -> np.ndarray:
    """User `user`'s items, oldest first."""
    return self.items[self.offsets[user]:self.offsets[user + 1]]

  @functools.cached_property
  def _item_table(self) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(self.item_ids[1:], kind="stable")
    return self.item_ids[1:][order], order

  @functools.cached_property
  def _user_table(self) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(self.user_ids, kind="stable")
    return self.user_ids[order], order

  @staticmethod
  def _lookup(table, original_ids, shift: int, unknown: int) -> np.ndarray:
    sorted_ids, order = table
    keys = np.asarray(original_ids)
    if keys.dtype.kind != "U":
      keys = keys.astype(str)
    if not len(sorted_ids):
      return np.full(keys.shape, unknown, dtype=np.int32)
    position = np.clip(np.searchsorted(sorted_ids, keys), 0, len(sorted_ids) - 1)
    found = sorted_ids[position] == keys
    return np.where(found, order[position] + shift, unknown).astype(np.int32)

  def item_index(self, original_ids) -> np.ndarray:
    """Item indices (int32, same shape) of original item ids; 0 for unknown ones."""
    return self._lookup(self._item_table, original_ids, 1, 0)

  def user_index(self, original_ids) -> np.ndarray:
    """User indices (int32, same shape) of original user ids; -1 for unknown ones."""
    return self._lookup(self._user_table, original_ids, 0, -1)

  def item_counts(self) -> np.ndarray:
    """[num_items + 1] int64 interactions per item in the training parts (seq[:-2])."""
    return splits.training_item_counts(self)

  def stats(self) -> dict:
    """Summary figures, JSON-serialisable."""
    lengths = self.lengths()
    has_users = len(lengths) > 0
    return {
        "dataset": self.name,
        "users": self.num_users,
        "items": self.num_items,
        "interactions": self.num_interactions,
        "mean_len": round(float(lengths.mean()), 4) if has_users else 0.0,
        "median_len": float(np.median(lengths)) if has_users else 0.0,
        "min_len": int(lengths.min()) if has_users else 0,
        "max_len": int(lengths.max()) if has_users else 0,
        "train_examples": int(np.maximum(lengths - 3, 0).sum()),
    }


def _check_config(data_config) -> None:
  choices = {"format": ("auto",) + readers.FORMATS, "dedup": transforms.DEDUP_MODES,
             "short_users": transforms.SHORT_USER_MODES, "missing_ids": columns.MISSING_ID_MODES}
  for field, allowed in choices.items():
    if data_config[field] not in allowed:
      raise DataError(f"--config.data.{field}={data_config[field]!r} is not valid; "
                      f"use one of {list(allowed)}.")
  for field in ("user_core", "item_core", "max_users"):
    if int(data_config[field]) < 0:
      raise DataError(f"--config.data.{field}={data_config[field]} must be >= 0 (0 = off).")


def _require_rows(frame, step: str, source: str, advice: str) -> None:
  """Raises DataError when `step` left no rows; `advice` names the setting to change."""
  if not len(frame):
    raise DataError(f"No interactions of {source} are left after {step}; {advice}.")


def build(spec: registry.ReadSpec, data_config) -> Dataset:
  """Reads and prepares the raw file `spec` (no cache)."""
  source = str(spec.path)
  frame = readers.read_interactions(spec.path, spec.format, spec.user_col, spec.item_col,
                                    spec.time_col, spec.rating_col, spec.separator,
                                    data_config.missing_ids)
  _require_rows(frame, "reading", source, "add interactions to the file")
  logging.info("Read %d interactions from %s.", len(frame), source)
  frame = transforms.add_file_order(frame)
  frame = transforms.filter_rating(frame, float(data_config.min_rating), source)
  _require_rows(frame, f"the rating filter --config.data.min_rating={data_config.min_rating}",
                source, "lower --config.data.min_rating (-1 keeps every rating)")
  frame = transforms.sort_chronologically(frame)
  tied_users, tied_interactions = transforms.count_time_ties(frame)
  if tied_interactions:
    logging.warning("%d interaction(s) of %d user(s) in %s have the same timestamp as another "
                    "of the same user; these ties are ordered by item id (compared as text), not "
                    "by their order in the file.", tied_interactions, tied_users, source)
  frame = transforms.deduplicate(frame, data_config.dedup)
  frame, passes = transforms.k_core(frame, int(data_config.user_core), int(data_config.item_core))
  _require_rows(frame, f"k-core filtering (--config.data.user_core={data_config.user_core}, "
                f"--config.data.item_core={data_config.item_core})", source,
                "lower --config.data.user_core and/or --config.data.item_core (0 = off)")
  logging.info("k-core kept %d interactions after %d pass(es).", len(frame), passes)
  frame = transforms.drop_short_users(frame, data_config.short_users,
                                      int(data_config.user_core), int(data_config.item_core),
                                      source)
  shortening = [f"--config.data.{field}={data_config[field]}" for field, active in (
      ("item_core", int(data_config.item_core) > 0), ("min_rating", data_config.min_rating >= 0),
      ("dedup", data_config.dedup != "none")) if active]
  _require_rows(frame, "dropping users with fewer than 3 interactions", source,
                f"relax {' / '.join(shortening)} so that users keep 3" if shortening else
                "use a file whose users have 3 or more interactions")
  frame = transforms.keep_first_users(frame, int(data_config.max_users))
  arrays = transforms.remap(frame)
  return Dataset(name=data_config.name, num_users=len(arrays["user_ids"]),
                 num_items=len(arrays["item_ids"]) - 1, **arrays)


def cache_dir(data_config) -> pathlib.Path:
  """config.data.cache_dir, else $DIFFUREC_CACHE, else the user cache dir."""
  path = data_config.cache_dir or os.environ.get("DIFFUREC_CACHE", "")
  return pathlib.Path(path).expanduser() if path else registry.user_cache_dir() / "prepared"


def cache_key(data_config, spec: registry.ReadSpec) -> str:
  """sha256 over the result-changing config fields and the raw file's identity."""
  stat = spec.path.stat()
  fields = {key: value for key, value in data_config.to_dict().items()
            if key not in _NOT_IN_CACHE_KEY}
  read = dict(dataclasses.asdict(spec), path=str(spec.path.resolve()))
  payload = {"version": CACHE_VERSION, "config": fields, "read": read,
             "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _cache_path(data_config, key: str) -> pathlib.Path:
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_config.name) or "data"
  return cache_dir(data_config) / f"{name}-{key[:24]}.npz"


def _load_cached(path: pathlib.Path, key: str) -> Dataset | None:
  """The cached dataset at `path`, or None if absent or unreadable (warned, rebuilt)."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as stored:
      if str(stored["key"]) != key:
        raise ValueError("its key does not match")
      ds = Dataset(name=str(stored["name"]), num_users=int(stored["num_users"]),
                   num_items=int(stored["num_items"]), items=stored["items"],
                   offsets=stored["offsets"], user_ids=stored["user_ids"],
                   item_ids=stored["item_ids"])
    if len(ds.items) and (ds.items.min() < 1 or ds.items.max() > ds.num_items):
      raise ValueError("item ids are out of range")
    if np.any(np.diff(ds.offsets) < transforms.MIN_SEQUENCE_LENGTH):
      raise ValueError("a sequence is too short")
    return ds
  except Exception as e:  # pylint: disable=broad-except  # Any bad cache is rebuilt.
    logging.warning("Ignoring unreadable cache file %s (%s: %s); rebuilding it.", path,
                    type(e).__name__, e)
    return None


def _atomic_write(path: pathlib.Path, write) -> None:
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _save_cached(path: pathlib.Path, key: str, ds: Dataset, data_config, source: str) -> None:
  """Writes `ds` as .npz (+ a .json summary) atomically; failures only warn."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(key=np.str_(key), name=np.str_(ds.name), num_users=ds.num_users,
                  num_items=ds.num_items, items=ds.items, offsets=ds.offsets,
                  user_ids=ds.user_ids, item_ids=ds.item_ids)
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    summary = {"key": key, "version": CACHE_VERSION, "source": source,
               "config": data_config.to_dict(), "stats": ds.stats()}
    text = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(text))
  except OSError as e:
    logging.warning("Could not write the prepared-data cache %s (%s); continuing without it.",
                    path, e)


def prepare_with_info(data_config, downloader: registry.Downloader | None = registry.download
                      ) -> tuple[Dataset, dict]:
  """Like `prepare`; also returns {'source': raw file, 'cache': npz path, 'cached': bool}."""
  _check_config(data_config)
  spec = registry.resolve(data_config, downloader)
  if not spec.path.is_file():
    raise DataError(
        f"Data file {str(spec.path)!r} was not found (looked at {spec.path.resolve()}); "
        "set --config.data.path to an existing file.")
  key = cache_key(data_config, spec)
  path = _cache_path(data_config, key)
  ds = _load_cached(path, key)
  cached = ds is not None
  if ds is None:
    ds = build(spec, data_config)
    _save_cached(path, key, ds, data_config, str(spec.path))
  else:
    logging.info("Loaded prepared %s from the cache %s.", ds.name, path)
  return ds, {"source": str(spec.path), "cache": str(path), "cached": cached}


def prepare(data_config, downloader: registry.Downloader | None = registry.download) -> Dataset:
  """The prepared Dataset for config.data (from the cache when it is up to date)."""
  return prepare_with_info(data_config, downloader)[0]


def prepare_and_report(data_config) -> dict:
  """Prepares config.data and returns its stats() plus source and cache info."""
  ds, info = prepare_with_info(data_config)
  return {**ds.stats(), **info}


def format_table(report: dict) -> str:
  """A two-column statistics table of a prepare_and_report() dict."""
  rows = [("dataset", report["dataset"]), ("users", report["users"]),
          ("items", report["items"]), ("interactions", report["interactions"]),
          ("mean length", report["mean_len"]), ("median length", report["median_len"]),
          ("min length", report["min_len"]), ("max length", report["max_len"]),
          ("training examples", report["train_examples"])]
  cells = [(label, f"{value:,}" if isinstance(value, int) else
            f"{value:,.2f}" if isinstance(value, float) else str(value)) for label, value in rows]
  width = max(len(label) for label, _ in cells)
  value_width = max(len(value) for _, value in cells)
  return "\n".join(f"{label:<{width}}  {value:>{value_width}}" for label, value in cells)
