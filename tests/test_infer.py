"""bin/infer.py on the session's trained workdir: test metrics again, recommendations, errors."""

import json
import pathlib

import numpy as np
import polars as pl
import pytest

import helpers_train as helpers
from helpers_train import synthetic_data, trained_run, trained_workdir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

TOPK = 5


def _infer(synthetic_data, *flags):
  return helpers.run_bin("infer.py", *flags, data_root=synthetic_data)


def _last_json(result) -> dict:
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_infer_reproduces_test_metrics(trained_workdir, synthetic_data):
  printed = _last_json(_infer(synthetic_data, "--workdir", str(trained_workdir)))
  results = helpers.read_json(trained_workdir / "results.json")
  assert {k: printed[k] for k in helpers.RESULT_KEYS} == results["test"]
  assert printed["best_epoch"] == results["best_epoch"]
  assert printed["split"] == "test"


# Recommendations in original ids --------------------------------------------------------------


@pytest.fixture(scope="module")
def original_ids(trained_workdir):
  """(user, [items in time order]) in ORIGINAL ids: a trained user with one unknown item, a
  new user, and a user whose items are all unknown."""
  with np.load(trained_workdir / "id_map.npz") as saved:
    user_ids, item_ids = saved["user_ids"], saved["item_ids"]
  known = [str(item) for item in item_ids[1:]]  # Row 0 is the padding item.
  return [
      (str(user_ids[0]), [known[0], known[1], "no-such-item", known[2]]),
      ("new-user", [known[3], known[4]]),
      ("ghost", ["no-such-item-1", "no-such-item-2"]),
  ], set(known)


def _write_csv(path: pathlib.Path, histories):
  lines = ["user,item,timestamp"]
  for user, items in histories:
    # Rows of a user in reverse time order: the reader must sort them by timestamp.
    lines += [f"{user},{item},{1000 + t}" for t, item in reversed(list(enumerate(items)))]
  path.write_text("\n".join(lines) + "\n")


def _check_recommendations(frame: pl.DataFrame, histories, known: set[str]):
  assert frame.columns[:4] == ["user", "rank", "item", "score"]
  assert frame["user"].unique(maintain_order=True).to_list() == [u for u, _ in histories]
  for user in (histories[0][0], "new-user"):
    rows = frame.filter(pl.col("user") == user)
    assert rows["rank"].to_list() == list(range(1, TOPK + 1))
    assert set(rows["item"].to_list()) <= known and rows["item"].n_unique() == TOPK
    scores = rows["score"].to_list()
    assert all(0.0 < s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert rows["error"].is_null().all()
  ghost = frame.filter(pl.col("user") == "ghost")
  assert ghost.height == 1 and ghost["item"].is_null().all() and ghost["rank"].is_null().all()
  assert "no known item" in ghost["error"][0]


@pytest.fixture(scope="module")
def csv_recommendations(trained_workdir, synthetic_data, original_ids, tmp_path_factory):
  folder = tmp_path_factory.mktemp("recs")
  _write_csv(folder / "histories.csv", original_ids[0])
  result = _infer(synthetic_data, "--workdir", str(trained_workdir), "--input",
                  str(folder / "histories.csv"), "--output", str(folder / "recs.csv"),
                  "--topk", str(TOPK))
  return result, folder / "recs.csv"


def test_recommend_from_csv_in_original_ids(csv_recommendations, original_ids):
  histories, known = original_ids
  result, output = csv_recommendations
  summary = _last_json(result)
  assert summary == {"output": str(output), "users": 3, "users_without_known_items": 1,
                     "unknown_items_skipped": 3}
  assert "skipped 3 unknown item(s)" in result.stderr
  frame = pl.read_csv(output, schema_overrides={"user": pl.String, "item": pl.String})
  _check_recommendations(frame, histories, known)


def test_recommend_from_jsonl_to_parquet_matches_csv(csv_recommendations, original_ids,
                                                      trained_workdir, synthetic_data, tmp_path):
  histories, known = original_ids
  source = tmp_path / "histories.jsonl"
  source.write_text("".join(json.dumps({"user": u, "items": items}) + "\n"
                            for u, items in histories))
  output = tmp_path / "recs.parquet"
  result = _infer(synthetic_data, "--workdir", str(trained_workdir), "--input", str(source),
                  "--output", str(output), "--topk", str(TOPK))
  assert _last_json(result)["unknown_items_skipped"] == 3
  assert "skipped 3 unknown item(s)" in result.stderr
  frame = pl.read_parquet(output)
  _check_recommendations(frame, histories, known)
  # Same histories (the CSV's sorted by time) -> the same recommendations.
  from_csv = pl.read_csv(csv_recommendations[1],
                         schema_overrides={"user": pl.String, "item": pl.String})
  assert frame.select("user", "rank", "item").equals(from_csv.select("user", "rank", "item"))
  np.testing.assert_allclose(frame["score"].fill_null(0).to_numpy(),
                             from_csv["score"].fill_null(0).to_numpy(), rtol=1e-6)


# Bad input: one `error:` line, exit status 2 --------------------------------------------------


def test_empty_directory_is_not_a_workdir(synthetic_data, tmp_path):
  helpers.assert_user_error(_infer(synthetic_data, "--workdir", str(tmp_path)),
                            "not a diffurec-jax workdir")


def test_workdir_without_checkpoint(trained_workdir, synthetic_data, tmp_path):
  for name in ("config.json", "id_map.npz"):
    (tmp_path / name).write_bytes((trained_workdir / name).read_bytes())
  helpers.assert_user_error(_infer(synthetic_data, "--workdir", str(tmp_path)),
                            "no validated checkpoint", "bin/train.py")


def _damage(workdir: pathlib.Path, which: str):
  best = next((workdir / "checkpoints" / "best").iterdir())
  files = [p for p in best.rglob("*") if p.is_file()]
  if which == "array data":
    files = [p for p in files if p.parent.name == "d"]  # OCDBT data files only.
  assert files
  for path in files:
    path.write_bytes(b"\x00garbage\xff")
  return best


def test_corrupt_checkpoint(trained_workdir, synthetic_data, tmp_path):
  workdir = helpers.copy_workdir(trained_workdir, tmp_path / "run")
  best = _damage(workdir, "every file")
  helpers.assert_user_error(_infer(synthetic_data, "--workdir", str(workdir)),
                            "corrupt", str(best))


def test_corrupt_checkpoint_arrays(trained_workdir, synthetic_data, tmp_path):
  # Orbax's metadata still reads; the array reads fail. The message is right, but tensorstore
  # threads may print 'RuntimeError: Event loop is closed' tracebacks around it (not raised,
  # varies from run to run), so only the status and the message are checked here.
  workdir = helpers.copy_workdir(trained_workdir, tmp_path / "run")
  _damage(workdir, "array data")
  result = _infer(synthetic_data, "--workdir", str(workdir))
  assert result.returncode == 2, result.stderr[-4000:]
  assert "error: The checkpoint at" in result.stderr and "is corrupt" in result.stderr


def test_input_without_output(trained_workdir, synthetic_data, tmp_path):
  source = tmp_path / "h.csv"
  source.write_text("user,item\na,b\n")
  helpers.assert_user_error(
      _infer(synthetic_data, "--workdir", str(trained_workdir), "--input", str(source)),
      "--input needs --output")


@pytest.mark.parametrize("name, content", [
    ("header_only.csv", "user,item,timestamp\n"),
    ("blank.jsonl", "\n"),
    ("empty.csv", ""),
])
def test_empty_input_file(trained_workdir, synthetic_data, tmp_path, name, content):
  source = tmp_path / name
  source.write_text(content)
  result = _infer(synthetic_data, "--workdir", str(trained_workdir), "--input", str(source),
                  "--output", str(tmp_path / "recs.csv"))
  helpers.assert_user_error(result, "holds no interactions", name)
  assert not (tmp_path / "recs.csv").exists()


@pytest.mark.parametrize("flags, words", [
    (["--seeds", "-1"], ["--seeds -1", "1 or more"]),
    (["--steps", "-2"], ["--steps -2"]),
    (["--steps", "99"], ["--steps 99", "32 diffusion steps"]),
    (["--input", "{h}", "--output", "{tmp}/r.csv", "--batch_size", "0"], ["--batch_size 0"]),
    (["--input", "{h}", "--output", "{tmp}/no/such/dir/r.csv"], ["does not exist"]),
    (["--input", "{h}", "--output", "{tmp}/r.txt"], ["--output", "r.txt", ".parquet"]),
    (["--input", "{h}", "--output", "{tmp}/r.csv", "--seeds", "-1"], ["--seeds -1"]),
])
def test_bad_serving_flags_are_one_line_before_any_work(trained_workdir, synthetic_data,
                                                       tmp_path, flags, words):
  history = tmp_path / "h.csv"
  history.write_text("user,item\na,b\n")
  flags = [flag.format(h=history, tmp=tmp_path) for flag in flags]
  result = _infer(synthetic_data, "--workdir", str(trained_workdir), *flags)
  helpers.assert_user_error(result, *words)
  assert not list(tmp_path.glob("r.*")) and "test" not in result.stdout


def test_an_unfinished_run_is_served_with_a_warning(trained_workdir, synthetic_data, tmp_path):
  workdir = helpers.copy_workdir(trained_workdir, tmp_path / "run")
  (workdir / "results.json").unlink()  # As a run that stopped on NaN or was never finished.
  best = helpers.read_json(trained_workdir / "results.json")["best_epoch"]
  printed = _last_json(_infer(synthetic_data, "--workdir", str(workdir)))
  assert printed["best_epoch"] == best
  result = _infer(synthetic_data, "--workdir", str(workdir))
  warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "has not finished" in warnings[0]
  assert f"best checkpoint so far, epoch {best}" in warnings[0]
