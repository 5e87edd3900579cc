"""The synthetic catalog: determinism, popularity, the planted signal, coverage, the pipeline."""

import dataclasses
import importlib.util
import json
import pathlib

import chex
import numpy as np
import polars as pl
import pytest

import helpers_train
from diffurec_jax import config as config_lib
from diffurec_jax import data
from diffurec_jax import errors
from diffurec_jax.data import readers, registry, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = synthetic.SyntheticSpec(num_items=2000)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
  """Generated files go to a tmp user cache dir; no real data root."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv("DIFFUREC_DATA", raising=False)


@pytest.fixture(scope="module")
def small_log():
  return synthetic.generate(SMALL)


def _synthetic_config(tmp_path, **fields):
  config = config_lib.base_config().data
  config.name = "synthetic"
  config.cache_dir = str(tmp_path / "prepared")
  for field, value in fields.items():
    config[field] = value
  return config


def _load_config_module():
  spec = importlib.util.spec_from_file_location("synthetic_config", REPO / "configs" /
                                                "synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_same_seed_same_log_other_seed_differs():
  spec = synthetic.SyntheticSpec(num_items=300, seed=3)
  first, again = synthetic.generate(spec), synthetic.generate(spec)
  assert first.frame.equals(again.frame)
  np.testing.assert_array_equal(first.successor, again.successor)
  other = synthetic.generate(synthetic.SyntheticSpec(num_items=300, seed=4))
  assert not np.array_equal(other.successor, first.successor)
  assert (other.frame.height != first.frame.height
          or not other.frame["item"].equals(first.frame["item"]))


@pytest.mark.parametrize("num_items, signal, expected", [
    (2000, 0.5, 2500),  # 2 * 2000 * 5 / (1 + 14 * 0.5) fresh draws per user.
    (1000, 1.0, 10000),  # Only the first item is fresh: 2 * 5000 / 1.
    (100, 0.0, 67),  # Every item fresh: ceil(2 * 500 / 15).
])
def test_default_num_users(num_items, signal, expected):
  spec = synthetic.SyntheticSpec(num_items=num_items, signal=signal)
  assert synthetic.default_num_users(spec) == expected
  assert synthetic.resolved(spec).num_users == expected
  assert synthetic.resolved(dataclasses.replace(spec, num_users=7)).num_users == 7


def test_log_layout(small_log):
  frame, spec = small_log.frame, small_log.spec
  assert frame.columns == ["user", "item", "timestamp"]
  assert frame.dtypes == [pl.Int32, pl.Int32, pl.Int64]
  chex.assert_shape(small_log.successor, (SMALL.num_items + 1,))
  users = frame["user"].to_numpy()
  assert np.all(np.diff(users) >= 0), "users are contiguous, in order"
  lengths = np.bincount(users)[1:]
  assert len(lengths) == spec.num_users
  assert lengths.min() >= spec.min_length and lengths.max() <= spec.max_length
  times = frame["timestamp"].to_numpy()
  same_user = users[1:] == users[:-1]
  assert np.all(np.diff(times)[same_user] > 0), "timestamps strictly increase within a user"


@pytest.mark.parametrize("changes", [{}, {"signal": 1.0}, {"signal": 0.0},
                                     {"zipf_exponent": 3.0, "min_item_count": 2}])
def test_every_item_occurs_min_item_count_times(changes):
  spec = dataclasses.replace(synthetic.SyntheticSpec(num_items=500), **changes)
  counts = np.bincount(synthetic.generate(spec).frame["item"].to_numpy(),
                       minlength=spec.num_items + 1)
  assert counts[0] == 0 and len(counts) == spec.num_items + 1
  assert counts[1:].min() >= spec.min_item_count


def test_successor_map_is_one_cycle_without_fixed_points():
  successor = synthetic.successor_map(50, np.random.default_rng(0))
  assert successor[0] == 0
  seen, item = [], 1
  for _ in range(50):
    seen.append(item)
    item = successor[item]
  assert item == 1 and sorted(seen) == list(range(1, 51))


def _top_share(log, fraction=0.01):
  counts = np.sort(np.bincount(log.frame["item"].to_numpy())[1:])[::-1]
  return counts[:max(1, int(len(counts) * fraction))].sum() / counts.sum()


def test_popularity_is_heavy_tailed(small_log):
  assert _top_share(small_log) > 0.1  # The top 1% of items: > 10x their uniform share.
  uniform = synthetic.generate(dataclasses.replace(SMALL, zipf_exponent=0.0))
  assert _top_share(uniform) < 0.03
  steeper = synthetic.generate(dataclasses.replace(SMALL, zipf_exponent=1.5))
  assert _top_share(steeper) > _top_share(small_log)


@pytest.mark.parametrize("probability", [0.0, 0.2, 0.5, 0.9])
def test_successor_signal_holds_at_rate_p(probability):
  log = synthetic.generate(dataclasses.replace(SMALL, signal=probability))
  # A fresh draw hits the successor by chance only rarely (about 1/N).
  assert abs(synthetic.successor_rate(log) - probability) < 0.02
  assert abs(synthetic.successor_rate(log, last_only=True) - probability) < 0.05


def test_full_signal_is_exact():
  log = synthetic.generate(synthetic.SyntheticSpec(num_items=200, signal=1.0))
  assert synthetic.successor_rate(log) == 1.0


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_csv_round_trips_through_the_long_reader(tmp_path, suffix):
  log = synthetic.generate(synthetic.SyntheticSpec(num_items=50))
  path = tmp_path / f"log{suffix}"
  synthetic.write_csv(log.frame, path)
  assert readers.detect_format(path) == "long"
  read = readers.read_long(path, "user", "item", "timestamp")
  assert read["user"].to_list() == [str(user) for user in log.frame["user"]]
  assert read["item"].to_list() == [str(item) for item in log.frame["item"]]
  assert read["time"].to_list() == log.frame["timestamp"].to_list()


def test_prepare_keeps_exactly_every_item_and_user(tmp_path):
  config = _synthetic_config(tmp_path, synthetic_items=1000)
  ds, info = data.prepare_with_info(config)
  spec = synthetic.resolved(synthetic.spec_from_config(config))
  assert (ds.num_items, ds.num_users) == (1000, spec.num_users)
  assert config.user_core == config.item_core == 5  # The default 5-core filters ran.
  generated = tmp_path / "xdg" / "diffurec_jax" / "data" / "synthetic" / synthetic.file_name(spec)
  assert info["source"] == str(generated) and generated.is_file() and not info["cached"]
  assert data.prepare_with_info(config)[1]["cached"]


def test_a_file_in_the_data_root_is_used_and_the_root_never_written(tmp_path):
  root = tmp_path / "root"
  config = _synthetic_config(tmp_path, synthetic_items=100, root=str(root))
  root.mkdir()
  assert registry.resolve(config).path.parent == tmp_path / "xdg/diffurec_jax/data/synthetic"
  assert not any(root.iterdir())
  placed = root / "synthetic" / synthetic.file_name(synthetic.spec_from_config(config))
  placed.parent.mkdir()
  placed.write_bytes(registry.resolve(config).path.read_bytes())
  assert registry.resolve(config).path == placed


def test_file_name_encodes_parameters():
  names = {synthetic.file_name(synthetic.SyntheticSpec(num_items=100, **changes)) for changes in (
      {}, {"seed": 1}, {"signal": 0.25}, {"zipf_exponent": 1.2}, {"num_users": 80},
      {"max_length": 30}, {"min_item_count": 6})}
  assert len(names) == 7
  assert synthetic.file_name(synthetic.SyntheticSpec(num_items=100)) == (
      f"synthetic-v{synthetic.VERSION}-n100-u125-p0.5-zipf1-len5-25-min5-seed0.csv.gz")


@pytest.mark.parametrize("changes, expected", [
    ({"num_items": 1}, "--config.data.synthetic_items=1"),
    ({"num_items": 2.5}, "--config.data.synthetic_items=2.5"),
    ({"signal": 1.5}, "--config.data.synthetic_signal=1.5"),
    ({"signal": -0.1}, "--config.data.synthetic_signal=-0.1"),
    ({"signal": float("nan")}, "--config.data.synthetic_signal=nan"),
    ({"zipf_exponent": -1.0}, "--config.data.synthetic_zipf=-1.0"),
    ({"num_users": -3}, "--config.data.synthetic_users=-3"),
    ({"seed": -1}, "--config.data.synthetic_seed=-1"),
    ({"min_length": 4}, "5 <= min_length"),
    ({"min_length": 9, "max_length": 8}, "5 <= min_length"),
    ({"min_item_count": 0}, "min_item_count=0"),
    ({"num_users": 10}, "use at least about"),
])
def test_bad_parameters_are_one_line_data_errors(changes, expected):
  spec = dataclasses.replace(synthetic.SyntheticSpec(num_items=100), **changes)
  with pytest.raises(data.DataError) as raised:
    synthetic.generate(spec)
  message = str(raised.value)
  assert expected in message and "\n" not in message


@pytest.mark.parametrize("arg, items, variant", [
    (None, 10_000, "diffurec"),
    ("items_1e5", 100_000, "diffurec"),
    ("items_1e6,sasrec", 1_000_000, "sasrec"),
    ("v2,items_1e4,smoke", 10_000, "v2"),
])
def test_config_presets_compose(arg, items, variant):
  config = _load_config_module().get_config(arg)
  assert (config.data.name, config.data.synthetic_items, config.variant) == (
      "synthetic", items, variant)
  if arg and "smoke" in arg:
    assert config.data.max_users == 400


@pytest.mark.parametrize("arg, expected", [
    ("items_1e4,items_1e5", "one size preset"),
    ("items_2e5", "items_1e6"),  # The known presets are listed, size presets included.
    ("v1,sasrec", "one variant preset"),
])
def test_config_bad_presets(arg, expected):
  with pytest.raises(errors.ConfigError, match=expected):
    _load_config_module().get_config(arg)


def _prepare_cli(tmp_path, *flags):
  env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "DIFFUREC_CACHE": str(tmp_path / "c"),
         "DIFFUREC_DATA": None}
  return helpers_train.run_script("bin/prepare_data.py", "--config",
                                  str(REPO / "configs" / "synthetic.py"), *flags, env=env)


def test_prepare_data_cli_generates_then_caches(tmp_path):
  first = _prepare_cli(tmp_path, "--config.data.synthetic_items=500")
  assert first.returncode == 0, first.stderr
  report = json.loads(first.stdout.strip().splitlines()[-1])
  assert (report["dataset"], report["items"], report["cached"]) == ("synthetic", 500, False)
  assert pathlib.Path(report["source"]).is_file()
  assert pathlib.Path(report["source"]).is_relative_to(tmp_path / "xdg")
  again = json.loads(_prepare_cli(tmp_path, "--config.data.synthetic_items=500"
                                  ).stdout.strip().splitlines()[-1])
  assert again["cached"] and again["users"] == report["users"]


def test_prepare_data_cli_bad_parameter_exits_2(tmp_path):
  result = _prepare_cli(tmp_path, "--config.data.synthetic_signal=1.5")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "synthetic_signal=1.5" in lines[0]
