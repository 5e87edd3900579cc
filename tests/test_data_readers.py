"""Readers: each file format on a tiny file, format detection, and bad input."""

import datetime
import gzip

import polars as pl
import pytest

from diffurec_jax import data
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
