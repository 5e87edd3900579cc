"""Transforms and the build step: k-core, order, dedup, short users, max_users, ids."""

import numpy as np
import polars as pl
import pytest

from diffurec_jax import config as config_lib
from diffurec_jax import data
from diffurec_jax.data import splits, transforms


def _frame(rows, with_time=True):
  columns = ["user", "item", "time"] if with_time else ["user", "item"]
  frame = pl.DataFrame([list(row) for row in rows], schema=columns, orient="row")
  return transforms.add_file_order(frame)


def _pairs(frame):
  return list(zip(frame["user"].to_list(), frame["item"].to_list()))


@pytest.fixture
def data_config(tmp_path):
  config = config_lib.base_config().data
  config.cache_dir = str(tmp_path / "cache")
  config.download = False
  config.user_core = 0
  config.item_core = 0
  return config


def _prepare(tmp_path, data_config, text, name="log.csv"):
  path = tmp_path / name
  path.write_text(text)
  data_config.path = str(path)
  return data.prepare(data_config)


def test_k_core_needs_several_passes():
  # D has 1 item -> drop D; then z has 1 user -> drop C-z; then C has 1 item -> drop C.
  frame = _frame([("A", "x", 0), ("A", "y", 1), ("B", "x", 2), ("B", "y", 3),
                  ("C", "x", 4), ("C", "z", 5), ("D", "z", 6)])
  kept, passes = transforms.k_core(frame, user_core=2, item_core=2)
  assert _pairs(kept) == [("A", "x"), ("A", "y"), ("B", "x"), ("B", "y")]
  assert passes == 3
  assert _pairs(transforms.k_core(frame, 0, 0)[0]) == _pairs(frame)


def test_item_core_only():
  frame = _frame([("A", "x", 0), ("A", "y", 1), ("B", "x", 2)])
  assert _pairs(transforms.k_core(frame, 0, 2)[0]) == [("A", "x"), ("B", "x")]


def test_chronological_order_and_the_tie_rule():
  frame = _frame([("u", "a", 3), ("v", "p", 9), ("u", "c", 1), ("u", "b", 1), ("v", "q", 1),
                  ("u", "d", 2), ("v", "9", 9), ("v", "10", 9)])
  ordered = transforms.sort_chronologically(frame)
  # Users in order of first appearance; within a user by time, ties by item id as text (b
  # before c, '10' before '9' before 'p'), whatever their order in the file.
  assert _pairs(ordered) == [("u", "b"), ("u", "c"), ("u", "d"), ("u", "a"), ("v", "q"),
                             ("v", "10"), ("v", "9"), ("v", "p")]


def test_exact_duplicates_keep_file_order():
  frame = _frame([("u", "b", 1), ("u", "a", 1), ("u", "b", 1), ("u", "a", 0)])
  frame = frame.with_columns(rating=pl.Series([5.0, 4.0, 3.0, 2.0]))
  ordered = transforms.sort_chronologically(frame)
  assert list(zip(ordered["item"], ordered["rating"])) == [("a", 2.0), ("a", 4.0), ("b", 5.0),
                                                           ("b", 3.0)]


@pytest.mark.parametrize("rows, expected", [
    ([("u", "a", 1), ("u", "b", 2), ("v", "a", 1)], (0, 0)),  # Equal times of other users.
    ([("u", "a", 1), ("u", "b", 1), ("u", "c", 1), ("u", "d", 2), ("v", "a", 5), ("v", "b", 5)],
     (2, 5)),
    ([("u", "a", 1), ("u", "a", 1)], (1, 2)),  # A repeated interaction is a tie too.
])
def test_count_time_ties(rows, expected):
  assert transforms.count_time_ties(_frame(rows)) == expected
  assert transforms.count_time_ties(_frame([row[:2] for row in rows], with_time=False)) == (0, 0)


def test_no_time_column_keeps_file_order():
  frame = _frame([("u", "a"), ("v", "p"), ("u", "b")], with_time=False)
  assert _pairs(transforms.sort_chronologically(frame)) == [("u", "a"), ("u", "b"), ("v", "p")]


@pytest.mark.parametrize("mode, expected", [
    ("none", [("u", "a", 1), ("u", "b", 2), ("u", "a", 3)]),
    ("first", [("u", "a", 1), ("u", "b", 2)]),
    ("last", [("u", "b", 2), ("u", "a", 3)]),
])
def test_deduplicate(mode, expected):
  frame = transforms.sort_chronologically(_frame([("u", "a", 3), ("u", "b", 2), ("u", "a", 1)]))
  result = transforms.deduplicate(frame, mode)
  assert list(zip(result["user"], result["item"], result["time"])) == expected


def test_keep_first_users_in_file_order():
  frame = transforms.sort_chronologically(
      _frame([("z", "a", 5), ("y", "a", 1), ("z", "b", 6), ("x", "c", 0)]))
  assert _pairs(transforms.keep_first_users(frame, 2)) == [("z", "a"), ("z", "b"), ("y", "a")]
  assert len(transforms.keep_first_users(frame, 0)) == 4


def test_remap_in_order_of_first_appearance():
  frame = transforms.sort_chronologically(
      _frame([("u9", "b", 2), ("u9", "a", 1), ("u1", "c", 0), ("u1", "a", 5)]))
  arrays = transforms.remap(frame)
  np.testing.assert_array_equal(arrays["items"], [1, 2, 3, 1])  # a, b | c, a
  np.testing.assert_array_equal(arrays["offsets"], [0, 2, 4])
  np.testing.assert_array_equal(arrays["user_ids"], ["u9", "u1"])
  np.testing.assert_array_equal(arrays["item_ids"], ["", "a", "b", "c"])
  assert arrays["items"].dtype == np.int32 and arrays["offsets"].dtype == np.int64


def test_prepare_orders_and_maps_ids(tmp_path, data_config):
  ds = _prepare(tmp_path, data_config,
                "user,item,timestamp\nB,y,5\nA,y,1\nB,x,5\nA,z,0\nB,z,4\nA,x,2\n")
  assert (ds.num_users, ds.num_items) == (2, 3)
  np.testing.assert_array_equal(ds.user_ids, ["B", "A"])
  np.testing.assert_array_equal(ds.item_ids, ["", "z", "x", "y"])  # B: z x y (tie by item id).
  np.testing.assert_array_equal(ds.items, [1, 2, 3, 1, 3, 2])  # A: z y x.
  np.testing.assert_array_equal(ds.offsets, [0, 3, 6])
  assert ds.items.dtype == np.int32 and ds.offsets.dtype == np.int64


def test_id_mapping_round_trip(tmp_path, data_config):
  ds = _prepare(tmp_path, data_config, "user,item,timestamp\n10,7,1\n10,8,2\n10,9,3\n20,9,1\n"
                "20,7,2\n20,5,3\n")
  originals = ds.item_ids[1:]
  np.testing.assert_array_equal(ds.item_ids[ds.item_index(originals)], originals)
  np.testing.assert_array_equal(ds.item_index([7, "9", "nope", ""]), [1, 3, 0, 0])
  np.testing.assert_array_equal(ds.item_index(np.array([5, 8])), [4, 2])
  np.testing.assert_array_equal(ds.user_ids[ds.user_index(ds.user_ids)], ds.user_ids)
  np.testing.assert_array_equal(ds.user_index(["20", 10, "30"]), [1, 0, -1])
  assert ds.item_index(["7"]).dtype == np.int32 and ds.user_index(["10"]).dtype == np.int32


def test_short_users_dropped_with_count(tmp_path, data_config, monkeypatch):
  logged = []
  monkeypatch.setattr(transforms.logging, "info", lambda *args: logged.append(args[0] % args[1:]))
  ds = _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\na,y,2\na,z,3\nb,x,1\nb,y,2\n"
                "c,x,1\n")
  np.testing.assert_array_equal(ds.user_ids, ["a"])
  assert any("Dropped 2 user(s) with fewer than 3" in line for line in logged)


def test_short_users_error(tmp_path, data_config):
  data_config.short_users = "error"
  with pytest.raises(data.DataError) as error:
    _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\na,y,2\na,z,3\nb,x,1\nb,y,2\n")
  message = str(error.value)
  assert "1 user(s)" in message and "fewer than 3" in message
  assert "--config.data.short_users=drop" in message


def test_dropping_short_users_keeps_item_core(tmp_path, data_config):
  # Dropping b (2 items) leaves item w with one user, so the item 2-core removes it too.
  data_config.item_core = 2
  ds = _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\na,y,2\na,z,3\na,w,4\n"
                "b,w,1\nb,v,2\nc,x,1\nc,y,2\nc,z,3\nd,v,1\nd,x,2\n")
  np.testing.assert_array_equal(ds.user_ids, ["a", "c"])
  np.testing.assert_array_equal(ds.item_ids, ["", "x", "y", "z"])


def test_max_users(tmp_path, data_config):
  data_config.max_users = 2
  ds = _prepare(tmp_path, data_config, "user,item,timestamp\nc,p,9\nb,x,1\nc,q,8\nc,r,7\n"
                "a,y,1\nb,y,2\nb,z,3\na,z,2\na,w,3\n")
  np.testing.assert_array_equal(ds.user_ids, ["c", "b"])
  np.testing.assert_array_equal(ds.item_ids, ["", "r", "q", "p", "x", "y", "z"])  # w dropped.


def test_min_rating(tmp_path, data_config):
  data_config.min_rating = 4
  data_config.rating_col = "rating"
  ds = _prepare(tmp_path, data_config, "user,item,rating,timestamp\na,x,5,1\na,y,4,2\na,z,1,3\n"
                "a,w,4.5,4\n")
  np.testing.assert_array_equal(ds.item_ids, ["", "x", "y", "w"])
  data_config.rating_col = ""
  with pytest.raises(data.DataError, match="--config.data.min_rating=-1"):
    _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\n")


def test_dedup_through_config(tmp_path, data_config):
  data_config.dedup = "first"
  ds = _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\na,y,2\na,x,3\na,z,4\n")
  np.testing.assert_array_equal(ds.item_ids[ds.items], ["x", "y", "z"])


def test_empty_after_k_core(tmp_path, data_config):
  data_config.user_core = 5
  data_config.item_core = 5
  with pytest.raises(data.DataError) as error:
    _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\na,y,2\na,z,3\n")
  message = str(error.value)
  assert "k-core" in message and "--config.data.user_core=5" in message and "log.csv" in message


def test_bad_config_values(tmp_path, data_config):
  data_config.dedup = "most"
  with pytest.raises(data.DataError, match="--config.data.dedup='most' is not valid"):
    _prepare(tmp_path, data_config, "user,item,timestamp\na,x,1\n")


def _user_sequences(ds):
  """{original user id: its original item ids, oldest first}, whatever the numbering."""
  return {user: tuple(ds.item_ids[ds.sequence(index)]) for index, user in enumerate(ds.user_ids)}


def _held_out(ds, split):
  """{original user id: original id of its held-out `split` item}."""
  examples = splits.eval_examples(ds, split)
  return dict(zip(ds.user_ids[examples.users], ds.item_ids[examples.targets]))


def test_shuffled_file_with_ties_prepares_the_same_dataset(tmp_path, data_config, caplog):
  # 40 users with 3 to 8 interactions on 6 days: most users have ties, the last two items
  # (valid, test) often among them; items 1..39 compare as text ('10' before '9').
  rng = np.random.default_rng(0)
  rows = [(f"u{user}", str(rng.integers(1, 40)), int(rng.integers(0, 6)))
          for user in range(40) for _ in range(rng.integers(3, 9))]
  frame = pl.DataFrame(rows, schema=["user", "item", "timestamp"], orient="row")
  tied = [row for row in rows if sum(other[0::2] == row[0::2] for other in rows) > 1]
  expected_line = (f"{len(tied)} interaction(s) of {len({row[0] for row in tied})} user(s) in "
                   "{path} have the same timestamp as another of the same user; these ties are "
                   "ordered by item id (compared as text), not by their order in the file.")
  prepared = []
  for seed in range(4):
    shuffled = frame if seed == 0 else frame.sample(fraction=1.0, shuffle=True, seed=seed)
    path = tmp_path / f"log{seed}.csv"
    caplog.clear()
    with caplog.at_level("WARNING"):
      ds = _prepare(tmp_path, data_config, shuffled.write_csv(), name=path.name)
    assert [r.getMessage() for r in caplog.records if "same timestamp" in r.getMessage()] == [
        expected_line.format(path=path)]
    prepared.append(ds)
  first = prepared[0]
  for ds in prepared[1:]:
    assert _user_sequences(ds) == _user_sequences(first)
    assert _held_out(ds, "valid") == _held_out(first, "valid")
    assert _held_out(ds, "test") == _held_out(first, "test")
    assert sorted(ds.item_ids) == sorted(first.item_ids)
  # The rule itself: by day, then item id as text.
  for user, sequence in _user_sequences(first).items():
    keys = sorted((day, item) for name, item, day in rows if name == user)
    assert sequence == tuple(item for _, item in keys), user


def test_sequence_files_keep_their_order(tmp_path, data_config, caplog):
  with caplog.at_level("WARNING"):
    ds = _prepare(tmp_path, data_config, "1 9 10 2 9\n2 3 1 3\n", name="Beauty.txt")
  assert _user_sequences(ds) == {"1": ("9", "10", "2", "9"), "2": ("3", "1", "3")}
  assert not [r for r in caplog.records if "same timestamp" in r.getMessage()]
