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
error naming them, or are dropped and counted with `missing_ids="drop"`. That cleaning of
the columns is data/columns.py.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import re

import polars as pl
from absl import logging

from diffurec_jax.data import columns as columns_lib
from diffurec_jax.data.errors import DataError

FORMATS = ("long", "inter", "movielens", "amazon", "sequences")
_HEADER_WORDS = {"user", "item", "user_id", "item_id", "userid", "itemid", "uid", "iid"}
_SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "space": " ", "semicolon": ";"}
_SEPARATOR_CANDIDATES = ("\t", ",", ";", "|", " ")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # Bytes kept by errors="surrogateescape".


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
  return columns_lib.finish(frame, path, {key: name for key, (name, _) in wanted.items()}, rows,
                            True, missing_ids)


def read_inter(path: pathlib.Path, missing_ids: str = "error") -> pl.DataFrame:
  """RecBole atomic `.inter` file: tab-separated, header fields `name:type`."""
  frame, rows = _read_csv(_read_bytes(path), path, separator="\t", quote_char=None)
  names = {column.split(":")[0].strip(): column for column in frame.columns}
  if "user_id" not in names or "item_id" not in names:
    raise DataError(
        f"RecBole file {path} needs 'user_id' and 'item_id' header fields but has "
        f"{frame.columns}; fix the header or set --config.data.format=long with column names.")
  return columns_lib.finish(frame, path, {"user": names["user_id"], "item": names["item_id"],
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
  return columns_lib.finish(frame, path, {"user": "field_0", "item": "field_1", "rating": "field_2",
                               "time": "field_3"}, lines, False, missing_ids)


def read_amazon(path: pathlib.Path, missing_ids: str = "error") -> pl.DataFrame:
  """Amazon 2014 ratings CSV: `user,item,rating,timestamp`, no header."""
  frame, lines = _read_csv(_read_bytes(path), path, has_header=False)
  if frame.width != 4:
    raise DataError(
        f"Amazon ratings file {path} has {frame.width} columns, not 4 (user,item,rating,"
        "timestamp); fix the file or choose another --config.data.format.")
  frame.columns = ["user", "item", "rating", "time"]
  return columns_lib.finish(frame, path, {"user": "user", "item": "item", "rating": "rating",
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
  frame = columns_lib.clean_ids(frame.drop("line"), frame["line"], False, path, missing_ids)
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
  columns_lib.warn_string_ids(frame, path)
  return frame
