"""Readers: raw interaction files -> one polars DataFrame in file order.

Every reader returns columns `user` (str), `item` (str), optionally `time` (int64 or
float64; absent = file order) and `rating` (float64), one row per interaction, in the
order of the file. Supported formats:

  long       CSV/TSV/parquet (optionally .gz) with a header; columns named by config.
  inter      RecBole atomic files: `user_id:token<TAB>item_id:token<TAB>...`.
  movielens  MovieLens `ratings.dat`: `UserID::MovieID::Rating::Timestamp`.
  amazon     Amazon 2014 ratings CSV: `user,item,rating,timestamp`, no header.
  sequences  S3-Rec text: `user i1 i2 ...` per line, already chronological.

`detect_format` picks one from the extension and the first lines. Nothing is
ever unpickled. Bytes that are not UTF-8 become U+FFFD with one warning, and ids
that are not integers are counted in one warning, since both change what ids mean.

Ids are normalised the same way in every format (`normalise_ids`): surrounding spaces
are stripped, and a whole number written as a float (1.0 in a float column, or the text
'1.0' / '1.00') becomes the integer text '1', so a pandas export of integer ids that
became floats gives the same ids as the integers. An empty cell, a null and the texts
NaN / null / None / NA / <NA> / N/A (any case) are missing ids: rows with one are an
error naming them, or are dropped and counted with `missing_ids="drop"`.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import re

import polars as pl
from absl import logging

from diffurec_jax.data.errors import DataError

FORMATS = ("long", "inter", "movielens", "amazon", "sequences")
_HEADER_WORDS = {"user", "item", "user_id", "item_id", "userid", "itemid", "uid", "iid"}
_SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "space": " ", "semicolon": ";"}
_SEPARATOR_CANDIDATES = ("\t", ",", ";", "|", " ")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # Bytes kept by errors="surrogateescape".
_INTEGER_ID = r"^[+-]?[0-9]+$"
_WHOLE_NUMBER_TEXT = r"^([+-]?[0-9]+)\.0*$"  # '5.0', '5.' or '5.00' -> '5'.
# What pandas, polars, R and Python write for a missing value (compared in lower case).
_MISSING_ID_TEXTS = ("", "nan", "null", "none", "na", "<na>", "n/a")
MISSING_ID_MODES = ("error", "drop")  # Rows whose user or item id is missing.
_ROWS_NAMED = 5  # Row numbers quoted in a missing-id message.


def _suffix(path: pathlib.Path) -> str:
  """The extension without a trailing `.gz`, lower case ('' if none)."""
  name = path.name.lower()
  if name.endswith(".gz"):
    name = name[:-3]
  return pathlib.PurePath(name).suffix


def _read_bytes(path: pathlib.Path) -> bytes:
  """The file's bytes, gunzipped when the name ends in .gz; warns once if not UTF-8."""
  try:
    if path.name.lower().endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      data = path.read_bytes()
  except (OSError, EOFError) as e:
    raise DataError(
        f"Could not read {path} ({e}); check that the file is complete and readable.") from e
  bad_lines = count_non_utf8_lines(data)
  if bad_lines:
    logging.warning("%d line(s) of %s had bytes that are not UTF-8; they were replaced by "
                    "U+FFFD: convert the file to UTF-8 to keep the original ids.", bad_lines, path)
  return data


def count_non_utf8_lines(data: bytes) -> int:
  """Number of lines of `data` holding bytes that are not valid UTF-8 (0 when it decodes)."""
  try:
    data.decode("utf-8")
    return 0
  except UnicodeDecodeError:
    pass
  text = data.decode("utf-8", errors="surrogateescape")
  count, line_end = 0, -1
  for match in _UNDECODABLE.finditer(text):
    if match.start() > line_end:  # The first bad byte of a new line.
      count += 1
      line_end = text.find("\n", match.start())
      if line_end < 0:
        break
  return count


def head_lines(path: pathlib.Path, num_lines: int = 20) -> list[str]:
  """The first `num_lines` non-empty lines of a text file (gz-aware)."""
  opener = gzip.open if path.name.lower().endswith(".gz") else open
  lines = []
  try:
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.strip():
          lines.append(line.rstrip("\r\n"))
        if len(lines) >= num_lines:
          break
  except (OSError, EOFError) as e:
    raise DataError(
        f"Could not read {path} ({e}); check that the file is complete and readable.") from e
  return lines


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _looks_like_sequences(lines: list[str], user_col: str, item_col: str) -> bool:
  """True for space-separated `user i1 i2 ...` lines without a header."""
  if not lines or any(c in line for line in lines for c in (",", "\t", ";", ":")):
    return False
  header = {token.lower() for token in lines[0].split()}
  if header & (_HEADER_WORDS | {user_col.lower(), item_col.lower()}):
    return False
  return all(len(line.split()) >= 2 for line in lines)


def detect_format(path: pathlib.Path, user_col: str = "user", item_col: str = "item") -> str:
  """Guesses the format of `path` from its extension and first lines (see module doc)."""
  suffix = _suffix(path)
  if suffix in (".parquet", ".pq"):
    return "long"
  if suffix == ".inter":
    return "inter"
  lines = head_lines(path)
  first = lines[0] if lines else ""
  if suffix == ".dat" and "::" in first:
    return "movielens"
  fields = first.split("\t")
  if len(fields) >= 2 and all(":" in field for field in fields):
    return "inter"  # A RecBole header in a file without the .inter extension.
  if suffix in (".txt", "") and _looks_like_sequences(lines, user_col, item_col):
    return "sequences"
  fields = [field.strip().strip('"') for field in first.split(",")]
  if (suffix == ".csv" and len(fields) == 4 and _is_number(fields[2]) and _is_number(fields[3])
      and user_col not in fields):
    return "amazon"
  return "long"


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


def _clean_ids(frame: pl.DataFrame, rows: pl.Series, header: bool, path: pathlib.Path,
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


def _finish(frame: pl.DataFrame, path: pathlib.Path, columns: dict[str, str], rows: pl.Series,
            header: bool, missing_ids: str) -> pl.DataFrame:
  """Renames `columns` (standard name -> file column), parses time and rating, cleans ids.

  rows: [frame.height] the spreadsheet row number of each row (see _clean_ids).
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
  return _clean_ids(pl.DataFrame(out), rows, header, path, missing_ids)


def _read_csv(data: bytes, path: pathlib.Path, has_header: bool = True,
              **kwargs) -> tuple[pl.DataFrame, pl.Series]:
  """polars.read_csv on bytes with every column as str, blank lines skipped.

  Returns the frame and each row's number as a spreadsheet shows the file (int64, the
  header is row 1). Parse errors become DataError.
  """
  try:
    frame = pl.read_csv(io.BytesIO(data), infer_schema=False, encoding="utf8-lossy",
                        has_header=has_header, **kwargs)
  except pl.exceptions.NoDataError as e:
    raise DataError(
        f"{path} is empty; point --config.data.path at a file with interactions.") from e
  except pl.exceptions.PolarsError as e:
    reason = str(e).strip().splitlines()[0]
    raise DataError(
        f"Could not parse {path} ({reason}); check the file and "
        "--config.data.format/separator.") from e
  rows = pl.int_range(1 + has_header, frame.height + 1 + has_header, dtype=pl.Int64, eager=True)
  if not frame.width:
    return frame, rows
  # polars reads a blank line as a row of nulls; the other readers skip blank lines too.
  blank = frame.select(pl.all_horizontal(pl.all().is_null())).to_series()
  return frame.filter(~blank), rows.filter(~blank)


def _long_separator(separator: str, path: pathlib.Path) -> str:
  """The separator from config, else the extension, else sniffed from the header."""
  if separator:
    separator = _SEPARATOR_NAMES.get(separator.lower(), separator)
    if len(separator) != 1:
      raise DataError(
          f"--config.data.separator={separator!r} must be one character (or 'tab'); "
          f"set it for {path}.")
    return separator
  suffix = _suffix(path)
  if suffix == ".csv":
    return ","
  if suffix in (".tsv", ".tab"):
    return "\t"
  header = (head_lines(path, 1) or [""])[0]
  for candidate in _SEPARATOR_CANDIDATES:
    if candidate in header:
      return candidate
  return ","


def _other_separator(columns: list[str], separator: str) -> str:
  """The separator a one-column header looks split by, other than `separator` ('' = none)."""
  if len(columns) != 1:
    return ""
  for candidate in _SEPARATOR_CANDIDATES:
    if candidate != separator and candidate in columns[0].strip():
      return candidate
  return ""


def read_long(path: pathlib.Path, user_col: str, item_col: str, time_col: str = "",
              rating_col: str = "", separator: str = "", missing_ids: str = "error"
              ) -> pl.DataFrame:
  """Long format with a header: one row per interaction, columns named by config."""
  if _suffix(path) in (".parquet", ".pq"):
    try:
      frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
      raise DataError(f"Could not read {path} as parquet ({e}); check the file.") from e
    where, sep = "parquet file", ""
    # Numbered as in the table's CSV export or a spreadsheet: the header is row 1.
    rows = pl.int_range(2, frame.height + 2, dtype=pl.Int64, eager=True)
  else:
    sep = _long_separator(separator, path)
    frame, rows = _read_csv(_read_bytes(path), path, separator=sep)
    where = f"header ({sep!r}-separated)"
  wanted = {"user": (user_col, "user_col"), "item": (item_col, "item_col"),
            "time": (time_col, "time_col"), "rating": (rating_col, "rating_col")}
  missing = [f"--config.data.{flag}" for name, flag in wanted.values()
             if name and name not in frame.columns]
  other = _other_separator(frame.columns, sep) if sep else ""
  if missing and other:  # A tab-separated .csv, say: name the separator, not the columns.
    kind = "tab" if other == "\t" else repr(other)
    raise DataError(
        f"{path} looks {kind}-separated (its header is {frame.columns[0]!r}), not "
        f"{sep!r}-separated; set --config.data.separator={other!r}.")
  if missing:
    raise DataError(
        f"{path} lacks the configured column(s) "
        f"{[name for name, _ in wanted.values() if name and name not in frame.columns]}: its "
        f"{where} has columns {frame.columns}; set {', '.join(missing)} to the right names "
        "(time_col/rating_col may be '' for none, or choose --config.data.format).")
  return _finish(frame, path, {key: name for key, (name, _) in wanted.items()}, rows, True,
                 missing_ids)


def read_inter(path: pathlib.Path, missing_ids: str = "error") -> pl.DataFrame:
  """RecBole atomic `.inter` file: tab-separated, header fields `name:type`."""
  frame, rows = _read_csv(_read_bytes(path), path, separator="\t", quote_char=None)
  names = {column.split(":")[0].strip(): column for column in frame.columns}
  if "user_id" not in names or "item_id" not in names:
    raise DataError(
        f"RecBole file {path} needs 'user_id' and 'item_id' header fields but has "
        f"{frame.columns}; fix the header or set --config.data.format=long with column names.")
  return _finish(frame, path, {"user": names["user_id"], "item": names["item_id"],
                               "time": names.get("timestamp", ""),
                               "rating": names.get("rating", "")}, rows, True, missing_ids)


def _split_lines(path: pathlib.Path, separator: str, num_fields: int,
                 example: str) -> tuple[pl.DataFrame, pl.Series]:
  """Non-empty lines split on a (multi-character) separator into exactly num_fields.

  Returns the fields and each line's number in the file (int64, 1-based).
  """
  text = _read_bytes(path).decode("utf-8", errors="replace")
  lines = pl.Series("line", text.splitlines()).str.strip_chars()
  numbers = pl.int_range(1, len(lines) + 1, dtype=pl.Int64, eager=True).filter(lines != "")
  lines = lines.filter(lines != "")
  if not len(lines):
    raise DataError(f"{path} is empty; point --config.data.path at a file with interactions.")
  counts = lines.str.count_matches(separator, literal=True)
  bad = (counts != num_fields - 1).arg_true()
  if len(bad):
    raise DataError(
        f"Line {lines[bad[0]]!r} of {path} does not have {num_fields} {separator!r}-separated "
        f"fields like {example!r}; fix the file or choose another --config.data.format.")
  return lines.str.split_exact(separator, num_fields - 1).struct.unnest(), numbers


def read_movielens(path: pathlib.Path, missing_ids: str = "error") -> pl.DataFrame:
  """MovieLens `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header."""
  frame, lines = _split_lines(path, "::", 4, "1::1193::5::978300760")
  return _finish(frame, path, {"user": "field_0", "item": "field_1", "rating": "field_2",
                               "time": "field_3"}, lines, False, missing_ids)


def read_amazon(path: pathlib.Path, missing_ids: str = "error") -> pl.DataFrame:
  """Amazon 2014 ratings CSV: `user,item,rating,timestamp`, no header."""
  frame, lines = _read_csv(_read_bytes(path), path, has_header=False)
  if frame.width != 4:
    raise DataError(
        f"Amazon ratings file {path} has {frame.width} columns, not 4 (user,item,rating,"
        "timestamp); fix the file or choose another --config.data.format.")
  frame.columns = ["user", "item", "rating", "time"]
  return _finish(frame, path, {"user": "user", "item": "item", "rating": "rating",
                               "time": "time"}, lines, False, missing_ids)


def read_sequences(path: pathlib.Path, missing_ids: str = "error") -> pl.DataFrame:
  """S3-Rec text: `user i1 i2 ...` per line; time = position in the user's sequence."""
  text = _read_bytes(path).decode("utf-8", errors="replace")
  tokens = pl.Series("tokens", text.splitlines()).str.extract_all(r"\S+")
  lines = pl.int_range(1, len(tokens) + 1, dtype=pl.Int64, eager=True)
  lines, tokens = lines.filter(tokens.list.len() > 0), tokens.filter(tokens.list.len() > 0)
  if not len(tokens):
    raise DataError(f"{path} is empty; point --config.data.path at a file with interactions.")
  frame = pl.DataFrame({"user": tokens.list.first(), "item": tokens.list.slice(1),
                        "line": lines})
  frame = frame.explode("item").drop_nulls("item")
  frame = _clean_ids(frame.drop("line"), frame["line"], False, path, missing_ids)
  return frame.with_columns(time=pl.int_range(pl.len(), dtype=pl.Int64).over("user"))


def read_interactions(path: str | pathlib.Path, format: str = "auto", user_col: str = "user",
                      item_col: str = "item", time_col: str = "", rating_col: str = "",
                      separator: str = "", missing_ids: str = "error") -> pl.DataFrame:
  """Reads any supported file into columns user, item[, time][, rating], file order.

  Ids are normalised (`normalise_ids`); rows with a missing user or item id raise a
  DataError naming them (missing_ids='error') or are dropped with one warning ('drop').
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise DataError(
        f"Data file {str(path)!r} was not found (looked at {path.resolve()}); "
        "set --config.data.path to an existing file.")
  if format == "auto":
    format = detect_format(path, user_col, item_col)
  readers = {"inter": read_inter, "movielens": read_movielens, "amazon": read_amazon,
             "sequences": read_sequences}
  if format == "long":
    frame = read_long(path, user_col, item_col, time_col, rating_col, separator, missing_ids)
  elif format in readers:
    frame = readers[format](path, missing_ids)
  else:
    raise DataError(
        f"Unknown --config.data.format={format!r} for {path}; choose auto or one of {FORMATS}.")
  _warn_string_ids(frame, path)
  return frame


def string_ids(frame: pl.DataFrame, column: str) -> pl.Series:
  """The distinct ids of `column` that are not integers, such as '5.0' or 'abc', in file order."""
  ids = frame[column].unique(maintain_order=True)
  return ids.filter(~ids.str.contains(_INTEGER_ID))


def _warn_string_ids(frame: pl.DataFrame, path: pathlib.Path) -> None:
  """One line when some ids are not integers: they are compared as text ('a1' != 'A1')."""
  users, items = string_ids(frame, "user"), string_ids(frame, "item")
  if len(users) or len(items):
    examples = ", ".join(repr(ids[0]) for ids in (users, items) if len(ids))
    logging.warning("%d user id(s) and %d item id(s) of %s are not integers (for example %s); "
                    "they are read as text, so ids spelled differently ('a1', 'A1') are "
                    "different ids.", len(users), len(items), path, examples)
