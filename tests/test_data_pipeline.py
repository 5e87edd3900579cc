"""Dataset, splits, histories, the cache, the registry and the real Beauty figures."""

import functools
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import urllib.parse
import zipfile

import numpy as np
import pytest
import requests  # pooch's transport; its errors are OSErrors.

from diffurec_jax import config as config_lib
from diffurec_jax import data
from diffurec_jax.data import registry, splits

REAL_DATA = os.environ.get("DIFFUREC_DATA", "")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
  """No test sees the real data root, cache or home."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv("DIFFUREC_DATA", raising=False)
  monkeypatch.delenv("DIFFUREC_CACHE", raising=False)


@pytest.fixture
def data_config(tmp_path):
  config = config_lib.base_config().data
  config.cache_dir = str(tmp_path / "cache")
  config.download = False
  config.user_core = 0
  config.item_core = 0
  return config


@pytest.fixture
def toy():
  # Users of lengths 3, 5 and 4.
  return data.Dataset.from_sequences([[1, 2, 3], [4, 5, 6, 7, 8], [2, 4, 6, 8]])


def test_dataset_fields_and_stats(toy):
  assert (toy.num_users, toy.num_items, toy.num_interactions) == (3, 8, 12)
  np.testing.assert_array_equal(toy.offsets, [0, 3, 8, 12])
  assert toy.item_ids[0] == "" and toy.item_ids.shape == (9,) and toy.user_ids.shape == (3,)
  assert toy.stats() == {"dataset": "toy", "users": 3, "items": 8, "interactions": 12,
                         "mean_len": 4.0, "median_len": 4.0, "min_len": 3, "max_len": 5,
                         "train_examples": 3}


def test_training_examples_exact(toy):
  examples = splits.training_examples(toy)
  np.testing.assert_array_equal(examples.users, [1, 1, 2])
  np.testing.assert_array_equal(examples.starts, [3, 3, 8])
  np.testing.assert_array_equal(examples.ends, [4, 5, 9])
  np.testing.assert_array_equal(examples.targets, [5, 6, 4])
  np.testing.assert_array_equal(examples.targets, toy.items[examples.ends])
  assert (examples.users.dtype, examples.starts.dtype, examples.ends.dtype,
          examples.targets.dtype) == (np.int32, np.int64, np.int64, np.int32)
  assert len(examples) == toy.stats()["train_examples"]


@pytest.mark.parametrize("split, ends, targets", [
    ("valid", [1, 6, 10], [2, 7, 6]),
    ("test", [2, 7, 11], [3, 8, 8]),
])
def test_eval_examples_exact(toy, split, ends, targets):
  examples = splits.eval_examples(toy, split)
  np.testing.assert_array_equal(examples.users, [0, 1, 2])
  np.testing.assert_array_equal(examples.starts, [0, 3, 8])
  np.testing.assert_array_equal(examples.ends, ends)
  np.testing.assert_array_equal(examples.targets, targets)


def test_eval_examples_bad_split(toy):
  with pytest.raises(ValueError, match="split must be one of"):
    splits.eval_examples(toy, "train")


def test_gather_histories_left_pads_and_truncates(toy):
  test = splits.eval_examples(toy, "test")
  np.testing.assert_array_equal(
      splits.gather_histories(toy.items, test.starts, test.ends, 3),
      [[0, 1, 2], [5, 6, 7], [2, 4, 6]])
  histories = splits.gather_histories(toy.items, test.starts, test.ends, 5)
  np.testing.assert_array_equal(histories, [[0, 0, 0, 1, 2], [0, 4, 5, 6, 7], [0, 0, 2, 4, 6]])
  assert histories.dtype == np.int32 and histories.shape == (3, 5)
  train = splits.training_examples(toy)
  np.testing.assert_array_equal(splits.gather_histories(toy.items, train.starts, train.ends, 2),
                                [[0, 4], [4, 5], [0, 2]])
  assert splits.gather_histories(toy.items, train.starts[:0], train.ends[:0], 4).shape == (0, 4)


def test_item_counts_training_part_only(toy):
  # Training parts: [1], [4, 5, 6], [2, 4].
  np.testing.assert_array_equal(toy.item_counts(), [0, 1, 1, 0, 2, 1, 1, 0, 0])
  assert toy.item_counts().dtype == np.int64


def _write_log(tmp_path, text="user,item,timestamp\na,x,1\na,y,2\na,z,3\nb,y,1\nb,z,2\nb,x,3\n"):
  path = tmp_path / "log.csv"
  path.write_text(text)
  return path


def test_cache_hit_and_invalidation(tmp_path, data_config):
  data_config.path = str(_write_log(tmp_path))
  first, info = data.prepare_with_info(data_config)
  assert not info["cached"] and pathlib.Path(info["cache"]).is_file()
  assert pathlib.Path(info["cache"]).with_suffix(".json").is_file()
  assert pathlib.Path(info["cache"]).parent == tmp_path / "cache"
  second, info2 = data.prepare_with_info(data_config)
  assert info2["cached"] and info2["cache"] == info["cache"]
  np.testing.assert_array_equal(first.items, second.items)
  np.testing.assert_array_equal(first.item_ids, second.item_ids)
  assert second.user_ids.dtype.kind == "U"
  # Fields that do not change the data share the cache.
  data_config.max_len = 7
  data_config.download = True
  assert data.prepare_with_info(data_config)[1]["cached"]
  # A config change that matters misses it.
  data_config.max_users = 1
  ds, info3 = data.prepare_with_info(data_config)
  assert not info3["cached"] and ds.num_users == 1
  data_config.max_users = 0
  # Raw file changes miss it too.
  _write_log(tmp_path, "user,item,timestamp\na,x,1\na,y,2\na,w,3\n")
  ds, info4 = data.prepare_with_info(data_config)
  assert not info4["cached"] and list(ds.item_ids) == ["", "x", "y", "w"]


def test_corrupt_cache_is_rebuilt(tmp_path, data_config, caplog):
  data_config.path = str(_write_log(tmp_path))
  _, info = data.prepare_with_info(data_config)
  pathlib.Path(info["cache"]).write_bytes(b"not a zip file")
  ds, info2 = data.prepare_with_info(data_config)
  assert not info2["cached"] and ds.num_users == 2
  assert "Ignoring unreadable cache file" in caplog.text
  cache = pathlib.Path(info["cache"])
  cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # Truncated.
  assert not data.prepare_with_info(data_config)[1]["cached"]
  assert data.prepare_with_info(data_config)[1]["cached"]


def test_registered_missing_file_says_where(tmp_path, data_config):
  data_config.name = "beauty"
  data_config.root = str(tmp_path / "root")
  with pytest.raises(data.DataError) as error:
    data.prepare(data_config)
  message = str(error.value)
  assert str(tmp_path / "root" / "beauty" / "s3rec" / "Beauty.txt") in message
  assert "beauty_5core_timestamped.csv.gz" in message
  assert registry.REGISTRY["beauty"][0].url in message
  assert registry.REGISTRY["beauty"][0].url.endswith(
      "RUCAIBox/CIKM2020-S3Rec/master/data/Beauty.txt")


def test_registered_root_from_env_and_fallback(tmp_path, data_config, monkeypatch):
  root = tmp_path / "root"
  path = root / "toys" / "derived" / "toys_5core_timestamped.csv.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:  # seq_pos is the primary file's order (S3-Rec's tie-break).
    f.write("user_id,item_id,seq_pos,timestamp\n1,3,2,4\n1,1,0,3\n1,2,1,4\n")
  monkeypatch.setenv("DIFFUREC_DATA", str(root))
  data_config.name = "toys"
  ds, info = data.prepare_with_info(data_config)
  assert info["source"] == str(path)
  np.testing.assert_array_equal(ds.item_ids[ds.items], ["1", "2", "3"])


def test_download_goes_to_user_cache(tmp_path, data_config):
  calls = []

  def fake_download(url, dest, checksum, member):
    calls.append((url, dest, checksum, member))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("1::10::5::3\n1::11::4::1\n1::12::4::2\n")

  data_config.name = "ml-1m"
  data_config.root = str(tmp_path / "readonly")
  data_config.download = True
  ds, info = data.prepare_with_info(data_config, downloader=fake_download)
  expected = tmp_path / "xdg" / "diffurec_jax" / "data" / "ml-1m" / "ratings.dat"
  assert calls == [("https://files.grouplens.org/datasets/movielens/ml-1m.zip", expected,
                    "md5:c4d9eecfca2ab87c1945afe126590906", "ml-1m/ratings.dat")]
  assert info["source"] == str(expected)
  np.testing.assert_array_equal(ds.item_ids[ds.items], ["11", "12", "10"])
  assert not (tmp_path / "readonly").exists()
  # Found in the user cache next time, without downloading.
  data.prepare(data_config, downloader=None)


def _download_error(data_config, tmp_path, name: str, downloader) -> str:
  """The DataError message of preparing registered dataset `name` with `downloader`."""
  data_config.name = name
  data_config.root = str(tmp_path / "root")
  data_config.download = True
  with pytest.raises(data.DataError) as error:
    data.prepare(data_config, downloader=downloader)
  return str(error.value)


def test_failed_download_says_what_to_put_where(tmp_path, data_config):
  def offline(url, dest, checksum, member):
    raise OSError("network is unreachable")

  message = _download_error(data_config, tmp_path, "toys", offline)
  assert "network is unreachable" in message
  assert str(tmp_path / "root" / "toys" / "s3rec" / "Toys_and_Games.txt") in message
  assert "Toys_and_Games.txt" in message and "CIKM2020-S3Rec" in message


def _from_file_uri(url, output_file, pooch):
  """A pooch downloader for file:// URLs (no network in tests)."""
  del pooch
  shutil.copyfile(urllib.parse.urlparse(url).path, output_file)


def test_download_checks_checksum(tmp_path, monkeypatch):
  monkeypatch.setattr(registry, "DOWNLOAD_RETRIES", 0)
  source = tmp_path / "Beauty.txt"
  source.write_text("1 2 3\n")
  dest = tmp_path / "out" / "Beauty.txt"
  with pytest.raises(ValueError, match="does not match the known hash"):
    registry.download(source.as_uri(), dest, "sha256:" + "0" * 64,
                      pooch_downloader=_from_file_uri)
  assert not dest.exists() and not list(dest.parent.iterdir())
  registry.download(source.as_uri(), dest, "sha256:" + hashlib.sha256(b"1 2 3\n").hexdigest(),
                    pooch_downloader=_from_file_uri)
  assert dest.read_text() == "1 2 3\n"


def test_checksum_mismatch_is_one_line_error(tmp_path, data_config, monkeypatch):
  monkeypatch.setattr(registry, "DOWNLOAD_RETRIES", 0)
  tampered = functools.partial(registry.download, pooch_downloader=(
      lambda url, output_file, pooch: pathlib.Path(output_file).write_text("not beauty\n")))
  message = _download_error(data_config, tmp_path, "beauty", tampered)
  assert "\n" not in message and "does not match the known hash" in message
  assert registry.REGISTRY["beauty"][0].checksum in message
  assert registry.REGISTRY["beauty"][0].url in message
  assert str(tmp_path / "root" / "beauty" / "s3rec" / "Beauty.txt") in message
  cache = tmp_path / "xdg" / "diffurec_jax" / "data" / "beauty" / "s3rec"
  assert not list(cache.iterdir())


def test_offline_download_through_pooch_says_what_to_put_where(tmp_path, data_config,
                                                               monkeypatch):
  def offline(url, output_file, pooch):
    raise requests.exceptions.ConnectionError(f"Failed to resolve {url}")

  monkeypatch.setattr(registry, "DOWNLOAD_RETRIES", 0)
  message = _download_error(data_config, tmp_path, "ml-1m", functools.partial(
      registry.download, pooch_downloader=offline))
  assert "\n" not in message and "Failed to resolve" in message
  assert "extract ml-1m/ratings.dat from https://files.grouplens.org" in message


def test_download_retries_a_failed_attempt(tmp_path, monkeypatch):
  source = tmp_path / "Beauty.txt"
  source.write_text("1 2 3\n")
  attempts = []

  def flaky(url, output_file, pooch):
    attempts.append(url)
    if len(attempts) == 1:
      raise requests.exceptions.ConnectionError("connection reset")
    _from_file_uri(url, output_file, pooch)

  monkeypatch.setattr(registry, "DOWNLOAD_RETRIES", 1)
  dest = tmp_path / "out" / "Beauty.txt"
  registry.download(source.as_uri(), dest, "sha256:" + hashlib.sha256(b"1 2 3\n").hexdigest(),
                    pooch_downloader=flaky)
  assert len(attempts) == 2 and dest.read_text() == "1 2 3\n"


def test_custom_without_path_and_unknown_name(data_config):
  with pytest.raises(data.DataError, match="--config.data.path=FILE"):
    data.prepare(data_config)
  data_config.name = "movies"
  with pytest.raises(data.DataError, match="Unknown dataset"):
    data.prepare(data_config)


def test_custom_missing_file(tmp_path, data_config):
  data_config.path = str(tmp_path / "missing.csv")
  with pytest.raises(data.DataError) as error:
    data.prepare(data_config)
  assert "missing.csv" in str(error.value) and str(tmp_path) in str(error.value)


@pytest.mark.skipif(not REAL_DATA, reason="DIFFUREC_DATA is not set")
def test_real_beauty_figures(data_config, monkeypatch):
  monkeypatch.setenv("DIFFUREC_DATA", REAL_DATA)
  data_config.name = "beauty"
  data_config.user_core = data_config.item_core = 5
  ds = data.prepare(data_config)
  stats = ds.stats()
  assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)
  assert (stats["min_len"], stats["max_len"], stats["median_len"]) == (5, 204, 6.0)
  assert len(splits.training_examples(ds)) == stats["train_examples"] == 131413
  # Beauty.txt is already remapped: its ids survive unchanged.
  np.testing.assert_array_equal(ds.item_ids[1:6], ["1", "2", "3", "4", "5"])
  assert ds.item_counts().sum() == 198502 - 2 * 22363


@pytest.mark.skipif(not REAL_DATA, reason="DIFFUREC_DATA is not set")
def test_real_toys_fallback_file_is_the_same_dataset(tmp_path, data_config, caplog):
  """The timestamped long file (with many same-day ties) prepares exactly the S3-Rec sequences."""
  derived = "toys/derived/toys_5core_timestamped.csv.gz"
  (tmp_path / "root" / derived).parent.mkdir(parents=True)
  (tmp_path / "root" / derived).symlink_to(pathlib.Path(REAL_DATA) / derived)
  data_config.name = "toys"
  data_config.user_core = data_config.item_core = 5
  data_config.root = REAL_DATA
  primary, info = data.prepare_with_info(data_config)
  assert info["source"].endswith("toys/s3rec/Toys_and_Games.txt")
  data_config.root = str(tmp_path / "root")
  with caplog.at_level("WARNING"):
    fallback, info = data.prepare_with_info(data_config)
  assert info["source"].endswith(derived) and "same timestamp" not in caplog.text
  for field in ("items", "offsets", "user_ids", "item_ids"):
    np.testing.assert_array_equal(getattr(fallback, field), getattr(primary, field))


# What pandas' to_csv writes for integer ids that became floats because of gaps (NaN).
PANDAS_EXPORT = ("user,item,timestamp\n1.0,10,1\n2.0,11,2\n,12,3\n1.0,13,4\n2.0,10,5\n1.0,11,6\n"
                 "2.0,12,7\n,13,8\n")


def _write_pandas_parquet(path):
  """PANDAS_EXPORT as parquet: a float user column with NaN and null, integer items."""
  import polars as pl
  pl.DataFrame({"user": [1.0, 2.0, float("nan"), 1.0, 2.0, 1.0, 2.0, None],
                "item": [10, 11, 12, 13, 10, 11, 12, 13],
                "timestamp": [1, 2, 3, 4, 5, 6, 7, 8]}).write_parquet(path)
  return path


@pytest.mark.parametrize("name", ["export.csv", "export.parquet"])
def test_float_ids_with_nan_are_an_error_or_dropped(tmp_path, data_config, caplog, name):
  path = tmp_path / name
  if name.endswith(".csv"):
    path.write_text(PANDAS_EXPORT)
  else:
    _write_pandas_parquet(path)
  data_config.path = str(path)
  with pytest.raises(data.DataError) as error:
    data.prepare(data_config)
  assert str(error.value) == (
      f"{path} has 2 rows with a missing user or item id (empty, NaN or null): rows 4 and 9, "
      "counting the header as row 1 as a spreadsheet does; fill in the ids, or set "
      "--config.data.missing_ids=drop to drop those rows.")
  data_config.missing_ids = "drop"
  with caplog.at_level("WARNING"):
    ds = data.prepare(data_config)
  assert [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()] == [
      f"Dropped 2 rows of {path} with a missing user or item id (empty, NaN or null; "
      "--config.data.missing_ids=drop): rows 4 and 9, counting the header as row 1 as a "
      "spreadsheet does."]
  # 1.0 and 2.0 are the users 1 and 2, the same ids as in a file of integers.
  np.testing.assert_array_equal(ds.user_ids, ["1", "2"])
  np.testing.assert_array_equal(ds.item_ids[ds.sequence(0)], ["10", "13", "11"])
  np.testing.assert_array_equal(ds.user_index([1, "2", "1.0"]), [0, 1, -1])


def test_whole_float_ids_are_the_integer_ids(tmp_path, data_config):
  data_config.path = str(_write_log(tmp_path, "user,item,timestamp\n7,1,1\n7.0,2.0,2\n"
                                              "7.00,3,3\n"))
  ds = data.prepare(data_config)
  np.testing.assert_array_equal(ds.user_ids, ["7"])
  np.testing.assert_array_equal(ds.item_ids, ["", "1", "2", "3"])


def _prepare_cli(tmp_path, path, *flags):
  import helpers_train
  repo = pathlib.Path(__file__).resolve().parents[1]
  return helpers_train.run_script(
      "bin/prepare_data.py", "--config", str(repo / "configs" / "custom.py"),
      f"--config.data.path={path}", "--config.data.download=False", "--config.data.user_core=0",
      "--config.data.item_core=0", *flags,
      env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "DIFFUREC_CACHE": str(tmp_path / "c")})


def test_prepare_cli_on_a_pandas_export_with_nan_ids(tmp_path, caplog):
  path = tmp_path / "export.csv"
  path.write_text(PANDAS_EXPORT)
  result = _prepare_cli(tmp_path, path)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "2 rows with a missing user or item id" in errors[0]
  assert "rows 4 and 9" in errors[0] and "--config.data.missing_ids=drop" in errors[0]
  with caplog.at_level("WARNING"):  # absl writes it to the process's stderr.
    result = _prepare_cli(tmp_path, path, "--config.data.missing_ids=drop")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.splitlines()[-1])["users"] == 2
  assert f"Dropped 2 rows of {path}" in caplog.text
  result = _prepare_cli(tmp_path, path, "--config.data.missing_ids=skip")
  assert result.returncode == 2 and "missing_ids" in result.stderr and "drop" in result.stderr


def test_prepare_cli_counts_ties(tmp_path, caplog):
  path = _write_log(tmp_path, "user,item,timestamp\na,y,1\na,x,1\na,z,3\nb,x,1\nb,y,2\n"
                              "b,z,3\n")
  with caplog.at_level("WARNING"):  # absl writes it to the process's stderr.
    result = _prepare_cli(tmp_path, path)
  assert result.returncode == 0, result.stderr
  assert (f"2 interaction(s) of 1 user(s) in {path} have the same timestamp as another of the "
          "same user; these ties are ordered by item id (compared as text), not by their order "
          "in the file.") in caplog.text


def test_download_extracts_archive_member(tmp_path):
  archive = tmp_path / "ml-1m.zip"
  with zipfile.ZipFile(archive, "w") as zipped:
    zipped.writestr("ml-1m/ratings.dat", "1::2::5::3\n")
    zipped.writestr("ml-1m/README", "readme")
  md5 = hashlib.md5(archive.read_bytes()).hexdigest()
  dest = tmp_path / "data" / "ml-1m" / "ratings.dat"
  registry.download(archive.as_uri(), dest, "md5:" + md5, "ml-1m/ratings.dat",
                    pooch_downloader=_from_file_uri)
  assert dest.read_text() == "1::2::5::3\n"
  assert sorted(path.name for path in dest.parent.iterdir()) == ["ratings.dat"]
