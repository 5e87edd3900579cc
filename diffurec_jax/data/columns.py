"""The columns every reader returns, cleaned: ids (normalised, missing ones raised or dropped),
timestamps (numbers or ISO dates as numbers) and ratings, with one-line errors that name the
file, the column and a bad value.
"""

from __future__ import annotations

import pathlib

import polars as pl
from absl import logging

from diffurec_jax.data.errors import DataError

_INTEGER_ID = r"^[+-]?[0-9]+$"
_WHOLE_NUMBER_TEXT = r"^([+-]?[0-9]+)\.0*$"  # '5.0', '5.' or '5.00' -> '5'.
# What pandas, polars, R and Python write for a missing value (compared in lower case).
_MISSING_ID_TEXTS = ("", "nan", "null", "none", "na", "<na>", "n/a")
MISSING_ID_MODES = ("error", "drop")  # Rows whose user or item id is missing.
_ROWS_NAMED = 5  # Row numbers quoted in a missing-id message.


def _epoch_seconds(times: pl.Series) -> pl.Series:
  """Datetimes as epoch seconds: int64 when whole, else float64."""
  micros = times.dt.epoch("us")
  if (micros % 1_000_000 == 0).all():
    return micros // 1_000_000
  return micros.cast(pl.Float64) / 1e6


def parse_time(values: pl.Series, column: str, path: pathlib.Path) -> pl.Series:
  """Timestamps as numbers: int64/float64 as given, or ISO dates as epoch seconds.

  Raises DataError naming the column and one value that is neither.
  """
  if values.dtype.is_numeric():
    if values.null_count():
      raise DataError(
          f"Column '{column}' of {path} has {values.null_count()} empty timestamps; "
          "fill them or set --config.data.time_col='' to use file order.")
    return values.cast(pl.Int64 if values.dtype.is_integer() else pl.Float64)
  if values.dtype.is_temporal() and values.null_count() == 0:
    return _epoch_seconds(values.cast(pl.Datetime("us")))
  text = values.cast(pl.String).str.strip_chars()
  as_int = text.cast(pl.Int64, strict=False)
  if as_int.null_count() == 0:
    return as_int
  as_float = text.cast(pl.Float64, strict=False)
  if as_float.null_count() == 0 and as_float.is_finite().all():
    return as_float
  try:
    as_date = text.str.to_datetime(strict=False, time_unit="us")
  except pl.exceptions.PolarsError:
    as_date = pl.Series([None] * len(text), dtype=pl.Datetime("us"))
  if as_date.null_count() == 0:
    return _epoch_seconds(as_date)
  bad = text.filter(as_float.is_null() & as_date.is_null())
  example = bad[0] if len(bad) else text.filter(as_float.is_null())[0]
  raise DataError(
      f"Column '{column}' of {path} has values that are neither numbers nor ISO dates "
      f"(for example {example!r}); fix the file or point --config.data.time_col at a "
      "numeric or ISO-date column ('' = file order).")


def parse_rating(values: pl.Series, column: str, path: pathlib.Path) -> pl.Series:
  """Ratings as float64; raises DataError naming the column and one bad value."""
  text = values.cast(pl.String).str.strip_chars()
  ratings = text.cast(pl.Float64, strict=False)
  if ratings.null_count():
    example = text.filter(ratings.is_null())[0]
    raise DataError(
        f"Column '{column}' of {path} has non-numeric ratings (for example {example!r}); "
        "fix the file or set --config.data.rating_col to a numeric column ('' = none).")
  return ratings


def normalise_ids(values: pl.Series) -> pl.Series:
  """Ids as stripped text; whole-number floats as integer text; missing ids as null.

  A float column's whole values (1.0) and texts like '1.0' or '1.00' become '1', the
  same id as the integer 1; other floats keep their text ('1.5'). NaN, null, an empty
  text and the texts in _MISSING_ID_TEXTS (any case) become null.
  """
  value = pl.col(values.name)
  if values.dtype.is_float():
    whole = value.is_finite() & (value == value.floor()) & (value.abs() < 2.0**63)
    text = (pl.when(value.is_nan()).then(None)
            .when(whole).then(value.cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(value.cast(pl.String)))
  else:
    text = value.cast(pl.String).str.strip_chars()
  text = text.str.replace(_WHOLE_NUMBER_TEXT, "${1}")
  missing = text.str.to_lowercase().is_in(_MISSING_ID_TEXTS)
  return values.to_frame().select(
      pl.when(missing).then(None).otherwise(text).alias(values.name)).to_series()


def _number_list(numbers: list[int], total: int) -> str:
  """'3', '3 and 5', '3, 5, 8, 9, 12 and 4 more' for `total` numbers starting with `numbers`."""
  texts = [str(number) for number in numbers[:_ROWS_NAMED]]
  if total > len(texts):
    texts.append(f"{total - len(texts)} more")
  return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def clean_ids(frame: pl.DataFrame, rows: pl.Series, header: bool, path: pathlib.Path,
               missing_ids: str) -> pl.DataFrame:
  """Normalises `user`/`item` (normalise_ids); rows with a missing id raise or are dropped.

  rows: [frame.height] int64, where each row is in the file for the message: its row as a
  spreadsheet shows it (the header is row 1) if `header`, else its line (one line of a
  sequences file holds many rows, which are then counted as interactions).
  """
  frame = frame.with_columns(user=normalise_ids(frame["user"]), item=normalise_ids(frame["item"]))
  missing = frame["user"].is_null() | frame["item"].is_null()
  count = int(missing.sum())
  if not count:
    return frame
  places = rows.filter(missing).unique(maintain_order=True)
  noun = "interaction" if rows.n_unique() < len(rows) else "row"  # Sequences: many per line.
  counted = f"{count} {noun}{'s' if count > 1 else ''}"
  where = ("row" if header else "line") + ("s " if len(places) > 1 else " ") + _number_list(
      places.head(_ROWS_NAMED).to_list(), len(places))
  if header:
    where += ", counting the header as row 1 as a spreadsheet does"
  if missing_ids == "error":
    raise DataError(
        f"{path} has {counted} with a missing user or item id (empty, NaN or null): {where}; "
        f"fill in the ids, or set --config.data.missing_ids=drop to drop those {noun}s.")
  assert missing_ids == "drop", missing_ids
  logging.warning("Dropped %s of %s with a missing user or item id (empty, NaN or null; "
                  "--config.data.missing_ids=drop): %s.", counted, path, where)
  return frame.filter(~missing)


def finish(frame: pl.DataFrame, path: pathlib.Path, columns: dict[str, str], rows: pl.Series,
            header: bool, missing_ids: str) -> pl.DataFrame:
  """Renames `columns` (standard name -> file column), parses time and rating, cleans ids.

  rows: [frame.height] the spreadsheet row number of each row (see clean_ids).
  """
  if not frame.height:
    raise DataError(
        f"{path} has column names {frame.columns} but no rows; add the interactions to it or "
        "point --config.data.path at a file that has them.")
  out = {"user": frame[columns["user"]], "item": frame[columns["item"]]}
  if columns.get("time"):
    out["time"] = parse_time(frame[columns["time"]], columns["time"], path)
  if columns.get("rating"):
    out["rating"] = parse_rating(frame[columns["rating"]], columns["rating"], path)
  return clean_ids(pl.DataFrame(out), rows, header, path, missing_ids)


def string_ids(frame: pl.DataFrame, column: str) -> pl.Series:
  """The distinct ids of `column` that are not integers, such as '5.0' or 'abc', in file order."""
  ids = frame[column].unique(maintain_order=True)
  return ids.filter(~ids.str.contains(_INTEGER_ID))


def warn_string_ids(frame: pl.DataFrame, path: pathlib.Path) -> None:
  """One line when some ids are not integers: they are compared as text ('a1' != 'A1')."""
  users, items = string_ids(frame, "user"), string_ids(frame, "item")
  if len(users) or len(items):
    examples = ", ".join(repr(ids[0]) for ids in (users, items) if len(ids))
    logging.warning("%d user id(s) and %d item id(s) of %s are not integers (for example %s); "
                    "they are read as text, so ids spelled differently ('a1', 'A1') are "
                    "different ids.", len(users), len(items), path, examples)
