"""A seeded synthetic interaction log with a planted sequential signal (catalogs up to 10^6 items).

`generate(spec)` draws, with numpy only (vectorised, seeded by `spec.seed`):

  lengths     each user's sequence length, uniform in [min_length, max_length] (mean 15);
  successor   a fixed random map item -> its successor: one random cycle through all N items,
              so no item is its own successor;
  sequences   the first item of a sequence is a *fresh* draw; each later item is the successor
              of the previous one with probability `signal` (p), else a fresh draw;
  fresh draws every item min_item_count times (the coverage, so the default 5-core filters keep
              all N items and all U users), the rest from a Zipf law: the item of popularity
              rank r (a seeded random order of the ids) has weight r^-zipf_exponent;
  timestamps  one per day and user on average, strictly increasing within a user.

The default number of users (`default_num_users`) gives twice as many fresh draws as the
coverage needs, so half of them follow the Zipf law and the catalog is heavy-tailed. For N = 10^6
that is 1.25 M users and about 19 M interactions.

The planted signal: the oracle that knows the successor map and recommends successor(previous
item) has an expected HR@1 of p + (1 - p) * (chance that a fresh draw equals that successor,
about 1/N on average), i.e. about p; `successor_rate(log, last_only=True)` measures it on the
leave-one-out test items. A trained model reaching HR@1 near p has learnt the map.

`write_csv` writes the log in the long format (`user,item,timestamp`, optionally gzipped) that
`readers.read_long` reads; `registry.resolve` generates the file on demand for
`--config.data.name=synthetic` (configs/synthetic.py).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import tempfile

import numpy as np
import polars as pl

from diffurec_jax.data.errors import DataError

NAME = "synthetic"  # config.data.name of the generated dataset.
VERSION = 1  # In the file name: bump when the same spec would generate a different log.
COVERAGE_FACTOR = 2.0  # Default users: fresh draws = this x the coverage's N * min_item_count.
START_TIME = 1_577_836_800  # 2020-01-01 00:00 UTC: the earliest first interaction.
START_SPREAD = 365 * 86_400  # Users start uniformly within a year.
TIME_STEP = 86_400  # Interaction k of a user falls in [k, k + 1) days after the user's start.
_CHUNK = 1 << 22  # Random numbers drawn per chunk, to bound the float64 temporaries.
_COLUMNS = ("user", "item", "timestamp")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Everything the generated log depends on (equal specs give equal logs)."""
  num_items: int  # N, item ids 1..N.
  num_users: int = 0  # U, user ids 1..U; 0 = default_num_users(spec).
  signal: float = 0.5  # p: P(next item = successor of the previous one).
  zipf_exponent: float = 1.0  # Popularity of rank r ~ r^-exponent (0 = uniform).
  min_length: int = 5  # Sequence lengths are uniform in [min_length, max_length].
  max_length: int = 25
  min_item_count: int = 5  # Every item occurs at least this often.
  seed: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticLog:
  """A generated log: frame (user int32, item int32, timestamp int64), users contiguous and
  chronological; successor: [N + 1] int32, successor[i] of item i (successor[0] = 0)."""
  spec: SyntheticSpec
  frame: pl.DataFrame
  successor: np.ndarray


def _is_integer(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (_is_integer(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def check(spec: SyntheticSpec) -> None:
  """Raises DataError naming the first bad parameter and the flag that sets it."""
  problems = (
      (_is_integer(spec.num_items) and spec.num_items >= 2, "synthetic_items", spec.num_items,
       "an integer >= 2"),
      (_is_integer(spec.num_users) and spec.num_users >= 0, "synthetic_users", spec.num_users,
       "an integer >= 0 (0 = derived from the number of items)"),
      (_is_number(spec.signal) and 0.0 <= spec.signal <= 1.0, "synthetic_signal", spec.signal,
       "a probability in [0, 1]"),
      (_is_number(spec.zipf_exponent) and spec.zipf_exponent >= 0.0, "synthetic_zipf",
       spec.zipf_exponent, "a number >= 0 (0 = uniform popularity)"),
      (_is_integer(spec.seed) and spec.seed >= 0, "synthetic_seed", spec.seed,
       "an integer >= 0"),
  )
  for ok, field, value, allowed in problems:
    if not ok:
      raise DataError(f"--config.data.{field}={value!r} must be {allowed}.")
  if not (_is_integer(spec.min_length) and _is_integer(spec.max_length)
          and 5 <= spec.min_length <= spec.max_length):
    raise DataError(f"Synthetic sequence lengths [{spec.min_length}, {spec.max_length}] must be "
                    "integers with 5 <= min_length <= max_length (the 5-core keeps every user).")
  if not (_is_integer(spec.min_item_count) and spec.min_item_count >= 1):
    raise DataError(f"Synthetic min_item_count={spec.min_item_count!r} must be an integer >= 1.")


def expected_fresh_per_user(spec: SyntheticSpec) -> float:
  """Expected fresh draws per user: the first item, then 1 - p of the others."""
  mean_length = (spec.min_length + spec.max_length) / 2
  return 1.0 + (mean_length - 1.0) * (1.0 - spec.signal)


def default_num_users(spec: SyntheticSpec) -> int:
  """Users whose fresh draws are COVERAGE_FACTOR x the coverage (N * min_item_count)."""
  coverage = spec.num_items * spec.min_item_count
  return math.ceil(COVERAGE_FACTOR * coverage / expected_fresh_per_user(spec))


def resolved(spec: SyntheticSpec) -> SyntheticSpec:
  """The checked spec with num_users filled in (0 -> default_num_users)."""
  check(spec)
  if spec.num_users:
    return spec
  return dataclasses.replace(spec, num_users=default_num_users(spec))


def file_name(spec: SyntheticSpec) -> str:
  """The CSV's name, encoding every parameter of the resolved spec and the generator version."""
  spec = resolved(spec)
  return (f"synthetic-v{VERSION}-n{spec.num_items}-u{spec.num_users}-p{spec.signal:g}"
          f"-zipf{spec.zipf_exponent:g}-len{spec.min_length}-{spec.max_length}"
          f"-min{spec.min_item_count}-seed{spec.seed}.csv.gz")


def spec_from_config(data_config) -> SyntheticSpec:
  """The spec that config.data's `synthetic_*` fields describe."""
  return SyntheticSpec(num_items=data_config.synthetic_items,
                       num_users=data_config.synthetic_users,
                       signal=data_config.synthetic_signal,
                       zipf_exponent=data_config.synthetic_zipf,
                       seed=data_config.synthetic_seed)


def popularity(num_items: int, exponent: float) -> np.ndarray:
  """[num_items] float64 probabilities of popularity ranks 1..N: r^-exponent, normalised."""
  weights = np.arange(1, num_items + 1, dtype=np.float64) ** -float(exponent)
  return weights / weights.sum()


def successor_map(num_items: int, rng: np.random.Generator) -> np.ndarray:
  """[num_items + 1] int32: one random cycle through items 1..N (no fixed point); [0] = 0."""
  cycle = rng.permutation(num_items).astype(np.int32) + 1
  successor = np.zeros(num_items + 1, dtype=np.int32)
  successor[cycle] = np.roll(cycle, -1)
  return successor


def _bernoulli(rng: np.random.Generator, probability: float, size: int) -> np.ndarray:
  """[size] bool, True with `probability`, drawn in chunks."""
  out = np.empty(size, dtype=bool)
  for start in range(0, size, _CHUNK):
    stop = min(start + _CHUNK, size)
    np.less(rng.random(stop - start), probability, out=out[start:stop])
  return out


def _zipf_items(rng: np.random.Generator, spec: SyntheticSpec, size: int) -> np.ndarray:
  """[size] int32 item ids from the popularity law; ranks map to ids by a random order."""
  cumulative = np.cumsum(popularity(spec.num_items, spec.zipf_exponent))
  by_rank = rng.permutation(spec.num_items).astype(np.int32) + 1
  out = np.empty(size, dtype=np.int32)
  for start in range(0, size, _CHUNK):
    stop = min(start + _CHUNK, size)
    ranks = np.searchsorted(cumulative, rng.random(stop - start) * cumulative[-1], side="right")
    out[start:stop] = by_rank[np.minimum(ranks, spec.num_items - 1)]
  return out


def _fresh_draws(rng: np.random.Generator, spec: SyntheticSpec, count: int) -> np.ndarray:
  """[count] int32: every item min_item_count times plus Zipf draws, shuffled."""
  coverage = spec.num_items * spec.min_item_count
  if count < coverage:
    needed = math.ceil(coverage / expected_fresh_per_user(spec))
    raise DataError(
        f"--config.data.synthetic_users={spec.num_users} gives {count} fresh draws, fewer than "
        f"the {coverage} needed for every item to occur {spec.min_item_count} times; use at least "
        f"about {needed} users (0 = derived).")
  draws = np.empty(count, dtype=np.int32)
  draws[:coverage] = np.repeat(np.arange(1, spec.num_items + 1, dtype=np.int32),
                               spec.min_item_count)
  draws[coverage:] = _zipf_items(rng, spec, count - coverage)
  rng.shuffle(draws)
  return draws


def _items(rngs, spec: SyntheticSpec, starts: np.ndarray, total: int,
           successor: np.ndarray) -> np.ndarray:
  """[total] int32: fresh draws, and successor chains after them (see the module doc)."""
  fresh = _bernoulli(rngs[0], 1.0 - spec.signal, total)
  fresh[starts] = True
  items = np.zeros(total, dtype=np.int32)
  items[fresh] = _fresh_draws(rngs[1], spec, int(np.count_nonzero(fresh)))
  pending = np.flatnonzero(~fresh)
  del fresh
  # Fill the chains one link per pass; the longest chain is max_length - 1 links.
  while pending.size:
    previous = items[pending - 1]
    ready = previous != 0
    items[pending[ready]] = successor[previous[ready]]
    pending = pending[~ready]
  return items


def _timestamps(rng: np.random.Generator, lengths: np.ndarray, starts: np.ndarray,
                total: int) -> np.ndarray:
  """[total] int64 epoch seconds: user start + position days + a jitter under a day."""
  times = np.arange(total, dtype=np.int64)
  times -= np.repeat(starts.astype(np.int32), lengths)  # Position within the user.
  times *= TIME_STEP
  times += rng.integers(0, TIME_STEP, total, dtype=np.int32)
  user_start = rng.integers(0, START_SPREAD, len(lengths), dtype=np.int32)
  times += np.repeat(user_start, lengths)
  times += START_TIME
  return times


def generate(spec: SyntheticSpec) -> SyntheticLog:
  """The log of `spec` (deterministic in it); raises DataError for bad parameters."""
  spec = resolved(spec)
  rngs = [np.random.default_rng(seed) for seed in np.random.SeedSequence(spec.seed).spawn(5)]
  successor = successor_map(spec.num_items, rngs[0])
  lengths = rngs[1].integers(spec.min_length, spec.max_length + 1, spec.num_users)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  total = int(offsets[-1])
  assert total < 2**31, total  # int32 positions.
  starts = offsets[:-1]
  items = _items(rngs[2:4], spec, starts, total, successor)
  times = _timestamps(rngs[4], lengths, starts, total)
  users = np.repeat(np.arange(1, spec.num_users + 1, dtype=np.int32), lengths)
  frame = pl.DataFrame({"user": users, "item": items, "timestamp": times})
  return SyntheticLog(spec=spec, frame=frame, successor=successor)


def write_csv(frame: pl.DataFrame, path: pathlib.Path, compress_level: int = 1) -> None:
  """Writes `frame` as a long-format CSV (gzipped when the name ends in .gz), atomically.

  Level 1 gzip: about 3x smaller than plain text at a fraction of level 6's time.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as raw:
      if path.name.endswith(".gz"):
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compress_level, mtime=0) as out:
          frame.write_csv(out)
      else:
        frame.write_csv(raw)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def ensure_file(spec: SyntheticSpec, directories: list[pathlib.Path],
                target: pathlib.Path) -> pathlib.Path:
  """The log's CSV: found as `directory/synthetic/<file_name>`, else generated under `target`."""
  relpath = pathlib.PurePath(NAME) / file_name(spec)
  for directory in directories:
    if (directory / relpath).is_file():
      return directory / relpath
  dest = target / relpath
  try:
    write_csv(generate(spec).frame, dest)
  except OSError as e:
    raise DataError(f"Could not write the synthetic log {dest} ({e}); set $XDG_CACHE_HOME to "
                    "a writable folder.") from e
  return dest


def _pairs(log: SyntheticLog, last_only: bool) -> tuple[np.ndarray, np.ndarray]:
  """(previous, next) item ids of consecutive interactions of the same user."""
  users = log.frame["user"].to_numpy()
  items = log.frame["item"].to_numpy()
  same_user = users[1:] == users[:-1]
  if last_only:
    last = np.append(users[1:] != users[:-1], True)[1:]  # Position t + 1 ends its user.
    same_user &= last
  return items[:-1][same_user], items[1:][same_user]


def successor_rate(log: SyntheticLog, last_only: bool = False) -> float:
  """Share of consecutive pairs whose next item is the previous one's successor (about p).

  With last_only, only each user's last item (the leave-one-out test item): the HR@1 of the
  oracle that recommends successor(previous item).
  """
  previous, following = _pairs(log, last_only)
  return float(np.mean(log.successor[previous] == following)) if len(previous) else 0.0
