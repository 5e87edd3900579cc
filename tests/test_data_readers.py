"""Readers: each file format on a tiny file, format detection, and bad input."""

import datetime
import gzip

import polars as pl
import pytest

from diffurec_jax import data
from diffurec_jax.data import columns
from diffurec_jax.data import readers


def _write(path, text):
  path.write_text(text)
  return path


def _rows(frame, *columns):
  return list(zip(*(frame[column].to_list() for column in columns)))


def test_long_csv_with_numeric_time_and_rating(tmp_path):
  path = _write(tmp_path / "log.csv",
                "user,item,timestamp,stars\nu1,i1,10,5\nu2,i2,5,3.5\nu1,007,7,1\n")
  frame = readers.read_interactions(path, "auto", "user", "item", "timestamp", "stars")
  assert frame.columns == ["user", "item", "time", "rating"]
  assert _rows(frame, "user", "item", "time", "rating") == [
      ("u1", "i1", 10, 5.0), ("u2", "i2", 5, 3.5), ("u1", "007", 7, 1.0)]
  assert frame["time"].dtype == pl.Int64 and frame["item"].dtype == pl.String


def test_long_tsv_gz_with_iso_dates(tmp_path):
  path = tmp_path / "log.tsv.gz"
  with gzip.open(path, "wt") as f:
    f.write("uid\tiid\twhen\n1\t2\t2020-01-01\n1\t3\t2020-01-02T00:00:01\n")
  frame = readers.read_interactions(path, "auto", "uid", "iid", "when")
  assert _rows(frame, "user", "item", "time") == [("1", "2", 1577836800), ("1", "3", 1577923201)]


def test_long_float_times_and_no_time_column(tmp_path):
  path = _write(tmp_path / "log.csv", "user,item,t\na,x,1.5\na,y,0.25\n")
  frame = readers.read_interactions(path, "long", time_col="t")
  assert frame["time"].to_list() == [1.5, 0.25] and frame["time"].dtype == pl.Float64
  frame = readers.read_interactions(path, "long", time_col="")
  assert frame.columns == ["user", "item"]


def test_long_separator_from_config(tmp_path):
  path = _write(tmp_path / "log.txt", "user;item\na;x\nb;y\n")
  frame = readers.read_interactions(path, "long", separator=";")
  assert _rows(frame, "user", "item") == [("a", "x"), ("b", "y")]
  frame = readers.read_interactions(path, "long")  # Sniffed from the header.
  assert _rows(frame, "user", "item") == [("a", "x"), ("b", "y")]


def test_long_parquet(tmp_path):
  path = tmp_path / "log.parquet"
  pl.DataFrame({"user": [1, 2], "item": ["x", "y"], "timestamp": [3, 4],
                "when": [datetime.datetime(2020, 1, 1),
                         datetime.datetime(2020, 1, 1, 0, 0, 1, 500000)]}).write_parquet(path)
  frame = readers.read_interactions(path, "auto", time_col="timestamp")
  assert _rows(frame, "user", "item", "time") == [("1", "x", 3), ("2", "y", 4)]
  frame = readers.read_interactions(path, "auto", time_col="when")
  assert frame["time"].to_list() == [1577836800.0, 1577836801.5]


def test_recbole_inter(tmp_path):
  path = _write(tmp_path / "ml.inter",
                "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                "1\t10\t4\t100\n2\t20\t3\t50\n")
  assert readers.detect_format(path) == "inter"
  frame = readers.read_interactions(path)
  assert _rows(frame, "user", "item", "rating", "time") == [
      ("1", "10", 4.0, 100), ("2", "20", 3.0, 50)]


def test_movielens_dat(tmp_path):
  path = _write(tmp_path / "ratings.dat",
                "1::1193::5::978300760\n1::661::3::978302109\n2::1::4::5\n")
  assert readers.detect_format(path) == "movielens"
  frame = readers.read_interactions(path)
  assert _rows(frame, "user", "item", "rating", "time") == [
      ("1", "1193", 5.0, 978300760), ("1", "661", 3.0, 978302109), ("2", "1", 4.0, 5)]


def test_amazon_ratings_csv(tmp_path):
  path = _write(tmp_path / "ratings_Beauty.csv", "A1,B00X,5.0,1391040000\nA2,B00Y,4.0,1391126400\n")
  assert readers.detect_format(path) == "amazon"
  frame = readers.read_interactions(path)
  assert _rows(frame, "user", "item", "rating", "time") == [
      ("A1", "B00X", 5.0, 1391040000), ("A2", "B00Y", 4.0, 1391126400)]


def test_s3rec_sequences(tmp_path):
  path = _write(tmp_path / "Beauty.txt", "1 5 6 7\n2 6  8\n\n3 9\n")
  assert readers.detect_format(path) == "sequences"
  frame = readers.read_interactions(path)
  assert _rows(frame, "user", "item", "time") == [
      ("1", "5", 0), ("1", "6", 1), ("1", "7", 2), ("2", "6", 0), ("2", "8", 1), ("3", "9", 0)]


@pytest.mark.parametrize("name, text, expected", [
    ("a.txt", "user item\n1 2\n", "long"),  # A header: not S3-Rec sequences.
    ("a.csv", "user,item,rating,timestamp\n1,2,3,4\n", "long"),
    ("a.csv", "1,2\n", "long"),
    ("a.dat", "1::2::3::4\n", "movielens"),
    ("a.txt", "1 2 3\n4 5\n", "sequences"),
    ("a.data", "user_id:token\titem_id:token\n1\t2\n", "inter"),
])
def test_detect_format(tmp_path, name, text, expected):
  assert readers.detect_format(_write(tmp_path / name, text)) == expected


def test_missing_file_names_file_and_place(tmp_path):
  with pytest.raises(data.DataError) as error:
    readers.read_interactions(tmp_path / "nope.csv")
  message = str(error.value)
  assert "nope.csv" in message and str(tmp_path) in message and "--config.data.path" in message


def test_misnamed_columns_list_found_columns_and_flags(tmp_path):
  path = _write(tmp_path / "log.csv", "user_id,item_id,ts\n1,2,3\n")
  with pytest.raises(data.DataError) as error:
    readers.read_interactions(path, "long", "user", "item_id", "timestamp")
  message = str(error.value)
  for text in ("'user'", "'timestamp'", "['user_id', 'item_id', 'ts']", "--config.data.user_col",
               "--config.data.time_col", str(path)):
    assert text in message
  assert "--config.data.item_col" not in message


def test_unparsable_timestamps_name_column_and_value(tmp_path):
  path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,100\n1,3,yesterday\n")
  with pytest.raises(data.DataError) as error:
    readers.read_interactions(path, "long", time_col="timestamp")
  message = str(error.value)
  assert "'timestamp'" in message and "'yesterday'" in message and str(path) in message


def test_bad_ratings_and_ragged_lines(tmp_path):
  path = _write(tmp_path / "ratings.dat", "1::2::x::4\n")
  with pytest.raises(data.DataError, match="non-numeric ratings.*'x'"):
    readers.read_interactions(path)
  path = _write(tmp_path / "ratings.dat", "1::2::5::4\n1::2\n")
  with pytest.raises(data.DataError, match="does not have 4 '::'-separated fields"):
    readers.read_interactions(path)


def test_empty_file(tmp_path):
  path = _write(tmp_path / "log.csv", "")
  with pytest.raises(data.DataError, match="is empty"):
    readers.read_interactions(path)


@pytest.mark.parametrize("name, content, format, bad_lines", [
    ("log.csv", b"user,item\nu\xff1,i1\nu2,i\xfe2\nu3,i3\n", "long", 2),
    ("log.csv", b"user,item\nu\xff\xfe1,i\xff1\nu2,i2\n", "long", 1),  # One line, many bytes.
    ("ratings.dat", b"1::\xe92::5::4\n", "movielens", 1),
    ("Beauty.txt", b"1 2 3\n\xff 4 5\n", "sequences", 1),
    ("log.csv", "user,item\nu\u00e9,i\ufffd\n".encode(), "long", 0),  # Valid UTF-8, even U+FFFD.
])
def test_non_utf8_bytes_warn_once_with_count_and_file(tmp_path, caplog, name, content, format,
                                                      bad_lines):
  path = tmp_path / name
  path.write_bytes(content)
  with caplog.at_level("WARNING"):
    frame = readers.read_interactions(path, format)
  warnings = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
  if bad_lines:
    assert warnings == [f"{bad_lines} line(s) of {path} had bytes that are not UTF-8; they were "
                        "replaced by U+FFFD: convert the file to UTF-8 to keep the original ids."]
    assert any("\ufffd" in value for value in frame["user"].to_list() + frame["item"].to_list())
  else:
    assert not warnings


@pytest.mark.parametrize("text, string_users, string_items, examples", [
    ("user,item\n1,2\n-3,007\n", [], [], ""),  # No line at all.
    ("user,item\n5.0,abc\n5,abc\n5.5,x\n", ["5.5"], ["abc", "x"], "'5.5', 'abc'"),
    ("user,item\nA1,1\nA2,2\n", ["A1", "A2"], [], "'A1'"),
])
def test_string_ids_are_counted_in_one_line(tmp_path, caplog, text, string_users, string_items,
                                            examples):
  path = _write(tmp_path / "log.csv", text)
  with caplog.at_level("WARNING"):
    frame = readers.read_interactions(path)
  assert columns.string_ids(frame, "user").to_list() == string_users
  assert columns.string_ids(frame, "item").to_list() == string_items
  lines = [r.getMessage() for r in caplog.records if "not integers" in r.getMessage()]
  if examples:
    assert lines == [f"{len(string_users)} user id(s) and {len(string_items)} item id(s) of "
                     f"{path} are not integers (for example {examples}); they are read as "
                     "text, so ids spelled differently ('a1', 'A1') are different ids."]
  else:
    assert not lines


@pytest.mark.parametrize("name, text, separator, expected", [
    ("log.csv", "user\titem\n1\t2\n", "", "looks tab-separated (its header is 'user\\titem'), "
     "not ','-separated; set --config.data.separator='\\t'."),
    ("log.csv", "user;item\n1;2\n", "", "looks ';'-separated"),
    ("log.tsv", "user,item\n1,2\n", "", "looks ','-separated (its header is 'user,item'), not "
     "'\\t'-separated; set --config.data.separator=','."),
    ("log.txt", "user|item\n1|2\n", ",", "set --config.data.separator='|'."),
    ("log.csv", "userid,itemid\n1,2\n", "", "lacks the configured column(s)"),  # Truly misnamed.
])
def test_wrong_separator_is_named(tmp_path, name, text, separator, expected):
  path = _write(tmp_path / name, text)
  with pytest.raises(data.DataError) as error:
    readers.read_interactions(path, "auto", separator=separator)
  message = str(error.value)
  assert str(path) in message and expected in message
  assert message.endswith(".") and "\n" not in message


@pytest.mark.parametrize("name, text, overrides, expected", [
    ("log.csv", "user,item\n", {}, "log.csv has column names ['user', 'item'] but no rows; add "
     "the interactions to it or point --config.data.path at a file that has them."),
    ("log.tsv", "user\titem\n\n", {}, "but no rows"),
    ("ml.inter", "user_id:token\titem_id:token\n", {}, "but no rows"),
    ("log.csv", "user,item,rating\na,x,1\na,y,2\na,z,3\n",
     {"min_rating": 4.0, "rating_col": "rating"},
     "lower --config.data.min_rating (-1 keeps every rating)."),
    ("log.csv", "user,item\na,x\na,y\na,z\n", {"user_core": 5},
     "lower --config.data.user_core and/or --config.data.item_core (0 = off)."),
    ("log.csv", "user,item\na,x\na,x\na,y\nb,x\n", {"dedup": "first"},
     "relax --config.data.dedup=first so that users keep 3."),
    ("log.csv", "user,item\na,x\na,y\nb,x\n", {},
     "use a file whose users have 3 or more interactions."),
])
def test_no_rows_says_which_setting(tmp_path, name, text, overrides, expected):
  from diffurec_jax import config as config_lib
  data_config = config_lib.base_config().data
  data_config.update(path=str(_write(tmp_path / name, text)), cache_dir=str(tmp_path / "cache"),
                     download=False, time_col="", user_core=0, item_core=0)
  data_config.update(overrides)
  with pytest.raises(data.DataError) as error:
    data.prepare(data_config)
  message = str(error.value)
  assert expected in message and "relax that setting" not in message
  assert message.endswith(".") and "\n" not in message


@pytest.mark.parametrize("values, expected", [
    # A float column (a pandas export of integer ids with gaps): whole numbers are integers.
    (pl.Series("user", [1.0, 2.0, float("nan"), None, 1.5, -3.0]), ["1", "2", None, None, "1.5",
                                                                    "-3"]),
    # The same as text: '7.0' is the id 7; leading zeros and other numbers stay as written.
    (pl.Series("user", [" 7 ", "7.0", "7.", "7.00", "-3.0", "007", "1.5", "1.0e3", "7.01"]),
     ["7", "7", "7", "7", "-3", "007", "1.5", "1.0e3", "7.01"]),
    # Missing: empty, blank, null and what pandas, polars, R and Python write for one.
    (pl.Series("user", ["", " ", None, "NaN", "nan", "NULL", "None", "NA", "<NA>", "n/a", "nana"]),
     [None] * 10 + ["nana"]),
    (pl.Series("user", [3, None], dtype=pl.Int64), ["3", None]),
])
def test_normalise_ids(values, expected):
  ids = columns.normalise_ids(values)
  assert ids.to_list() == expected and ids.dtype == pl.String and ids.name == "user"


@pytest.mark.parametrize("name, text, expected", [
    # What pandas' to_csv writes for float ids with NaN; a blank line still counts as a row.
    ("log.csv", "user,item,timestamp\n1.0,10.0,1\n2.0,11.0,2\n,12.0,3\n\n1.0,13.0,4\nNaN,14.0,5\n",
     "has 2 rows with a missing user or item id (empty, NaN or null): rows 4 and 7, counting the "
     "header as row 1 as a spreadsheet does; fill in the ids, or set "
     "--config.data.missing_ids=drop to drop those rows."),
    ("log.csv", "user,item\n" + "".join(f"{'u' if i % 2 else ''},{i}\n" for i in range(20)),
     "has 10 rows with a missing user or item id (empty, NaN or null): rows 2, 4, 6, 8, 10 and "
     "5 more, counting the header as row 1"),
    ("ml.inter", "user_id:token\titem_id:token\n1\t5\n2\tnull\n", ": row 3, counting the header"),
    ("ratings.dat", "1::2::5::4\n\nnan::3::5::4\n", "has 1 row with a missing user or item id "
     "(empty, NaN or null): line 3; fill in the ids"),
    ("ratings_Beauty.csv", "A1,B1,5.0,1\n,B2,4.0,2\n", ": line 2;"),
    ("Beauty.txt", "1 2 3\nNaN 4 5\n2 nan 6\n", "has 3 interactions with a missing user or "
     "item id (empty, NaN or null): lines 2 and 3; fill in the ids, or set "
     "--config.data.missing_ids=drop to drop those interactions."),
])
def test_missing_ids_are_an_error_naming_rows_and_flag(tmp_path, name, text, expected):
  path = _write(tmp_path / name, text)
  with pytest.raises(data.DataError) as error:
    readers.read_interactions(path)
  message = str(error.value)
  assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_missing_ids_dropped_with_one_line(tmp_path, caplog):
  path = _write(tmp_path / "log.csv", "user,item,timestamp\n1.0,10.0,1\n,11.0,2\n2.0,NaN,3\n")
  with caplog.at_level("WARNING"):
    frame = readers.read_interactions(path, time_col="timestamp", missing_ids="drop")
  assert _rows(frame, "user", "item", "time") == [("1", "10", 1)]
  assert [r.getMessage() for r in caplog.records] == [
      f"Dropped 2 rows of {path} with a missing user or item id (empty, NaN or null; "
      "--config.data.missing_ids=drop): rows 3 and 4, counting the header as row 1 as a "
      "spreadsheet does."]
  path = _write(tmp_path / "Beauty.txt", "1 2 nan 3\n")  # Positions close up.
  frame = readers.read_interactions(path, missing_ids="drop")
  assert _rows(frame, "user", "item", "time") == [("1", "2", 0), ("1", "3", 1)]
