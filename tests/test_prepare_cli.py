"""bin/prepare_data.py end to end (in this process): figures, JSON last line, exit codes."""

import json
import pathlib

import pytest

import helpers_train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(tmp_path, *flags):
  env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "DIFFUREC_CACHE": str(tmp_path / "c"),
         "DIFFUREC_DATA": None}
  return helpers_train.run_script("bin/prepare_data.py", *flags, env=env)


def _custom(path, *flags):
  return ("--config", str(REPO / "configs" / "custom.py"), f"--config.data.path={path}",
          "--config.data.download=False", *flags)


def test_prints_table_and_json_last_line(tmp_path):
  path = tmp_path / "log.csv"
  path.write_text("user,item,timestamp\na,x,1\na,y,2\na,z,3\nb,y,1\nb,z,2\nb,x,3\nc,x,1\n")
  result = _run(tmp_path, *_custom(path, "--config.data.user_core=0",
                                   "--config.data.item_core=0"))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  report = json.loads(lines[-1])
  assert {key: report[key] for key in ("dataset", "users", "items", "interactions")} == {
      "dataset": "custom", "users": 2, "items": 3, "interactions": 6}
  assert report["train_examples"] == 0
  table = "\n".join(lines[:-1])
  for label in ("users", "items", "interactions", "mean length", "median length",
                "training examples"):
    assert label in table


@pytest.mark.parametrize("text, flags, expected", [
    (None, (), "missing.csv"),
    ("uid,iid,timestamp\na,x,1\n", (), "--config.data.user_col"),
    ("user,item,timestamp\na,x,noon\n", (), "'noon'"),
    ("user,item,timestamp\na,x,1\na,y,2\n", ("--config.data.user_core=0",
                                             "--config.data.item_core=0",
                                             "--config.data.short_users=error"),
     "--config.data.short_users=drop"),
    ("user,item,timestamp\na,x,1\na,y,2\n", (), "k-core"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, text, flags, expected):
  path = tmp_path / ("missing.csv" if text is None else "log.csv")
  if text is not None:
    path.write_text(text)
  result = _run(tmp_path, *_custom(path, *flags))
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], result.stderr


@pytest.mark.parametrize("flags, expected", [
    (("--config", "configs/custom.py", "--config.data.max_user=3"), "max_users"),
    (("--config", "configs/custom.py", "--config.data.max_users=three"), "three"),
    (("--config", "configs/custom.py:nope"), "Unknown preset"),
    (("--config", "configs/missing.py"), "configs/missing.py"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, expected):
  result = _run(tmp_path, *flags)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.startswith("error: ") and expected in result.stderr
