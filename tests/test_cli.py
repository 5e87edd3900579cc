"""The entrypoints as a new user meets them: interrupts, time, workdir rules, errors, serving
options, help, plots. The scripts run in this process (helpers_train.run_script) except where
only a real process shows the behaviour: Ctrl-C, and one exit status as the shell sees it.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

import helpers_train as helpers
from helpers_train import synthetic_data, trained_run, trained_workdir  # noqa: F401  (fixtures)

from diffurec_jax import cli
from diffurec_jax.lab import report
from diffurec_jax.training import interrupt
from diffurec_jax.training import workdir as workdir_lib


def _train(synthetic_data, *flags, **kwargs):
  return helpers.run_bin("train.py", *flags, data_root=synthetic_data, **kwargs)


# Ctrl-C: one line, exit 130, the rerun resumes ----------------------------------------------


def _interrupt_when(process, text: str, timeout: float = 240) -> str:
  """Reads stdout until a line contains `text`, then sends SIGINT; returns what was read."""
  seen, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line:
      break
    seen.append(line)
    if text in line:
      process.send_signal(signal.SIGINT)
      return "".join(seen)
  process.kill()
  pytest.fail(f"{text!r} never printed:\n{''.join(seen)}")


@pytest.mark.slow
def test_ctrl_c_saves_and_the_rerun_resumes(synthetic_data, tmp_path):
  flags = helpers.cli_flags({"train.num_epochs": 40}) + ["--workdir", str(tmp_path / "run")]
  env = dict(os.environ, DIFFUREC_DATA=str(synthetic_data), PYTHONUNBUFFERED="1",
             **helpers.COMPILATION_CACHE_ENV)
  for expected_start in ("starting a new run", "resuming from epoch"):
    process = subprocess.Popen([sys.executable, str(helpers.REPO / "bin" / "train.py"), *flags],
                               cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out = _interrupt_when(process, "compiled the train step")  # Training is under way.
    started = time.time()
    rest, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert time.time() - started < 30
    assert expected_start in out
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0], err[-3000:]
    assert "Traceback" not in err
  assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.3, 1.0, 2.0])
def test_ctrl_c_in_the_first_seconds_is_one_line(synthetic_data, tmp_path, after_s):
  """During imports, flag parsing, data preparation, set-up or the first compilation: exit 130,
  one line (plus the notice when a compilation delays the stop), no traceback and no
  'Exception ignored' (a signal can land inside a JAX GC callback)."""
  env = dict(os.environ, DIFFUREC_DATA=str(synthetic_data), **helpers.COMPILATION_CACHE_ENV)
  process = subprocess.Popen(
      [sys.executable, str(helpers.REPO / "bin" / "train.py"), *helpers.cli_flags(),
       "--workdir", str(tmp_path / "run")], cwd=helpers.REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      # As from a terminal: a parent started in the background may ignore SIGINT.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  time.sleep(after_s)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  lines = [line for line in err.replace("\r", "\n").splitlines()  # Less bars and log lines.
           if line.strip() and "it/s" not in line and "step/s" not in line and "?" not in line
           and not re.match(r"[IW]\d{4} ", line) and line != interrupt.NOTICE]
  assert process.returncode == 130, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("interrupted"), err[-3000:]
  assert "Traceback" not in err and "Exception ignored" not in err


def _chained(*kinds):
  """An exception of kinds[-1] raised while handling kinds[-2], ... (the first innermost)."""
  error = None
  for kind in kinds:
    try:
      raise kind("x") from error
    except BaseException as raised:  # noqa: BLE001  (the chain is the point)
      error = raised
  return error


@pytest.mark.parametrize("kinds, expected", [
    ((KeyboardInterrupt,), True),
    ((KeyboardInterrupt, ImportError), True),  # Ctrl-C inside a C extension's import.
    ((KeyboardInterrupt, ImportError, RuntimeError), True),
    ((ImportError,), False),
    ((ValueError, ImportError), False),
])
def test_caused_by_interrupt(kinds, expected):
  assert cli.caused_by_interrupt(_chained(*kinds)) is expected


@pytest.mark.parametrize("seen, kinds, expected", [
    (True, (ImportError,), True),  # numpy's ImportError, unlinked to the Ctrl-C seen meanwhile.
    (True, (ValueError, ImportError), True),
    (False, (ImportError,), False),
    (False, (KeyboardInterrupt, ImportError), True),
])
def test_interrupted_counts_a_ctrl_c_seen_during_the_imports(monkeypatch, seen, kinds,
                                                             expected):
  monkeypatch.setitem(cli._EARLY_SIGINT, "seen", seen)
  assert cli.interrupted(_chained(*kinds)) is expected


_RAISES = """
import sys
from diffurec_jax import cli
def main(argv):
  try:
    if sys.argv[1] == "interrupted":
      raise KeyboardInterrupt
    raise OSError("disk")
  except BaseException as error:
    raise ImportError("numpy._core.multiarray failed to import") from error
cli.run(main)
"""


@pytest.mark.parametrize("case, code, one_line", [("interrupted", 130, "interrupted"),
                                                  ("other", 1, None)])
def test_an_import_broken_by_ctrl_c_is_an_interrupt(case, code, one_line):
  """Only an error a Ctrl-C caused becomes 'interrupted' (exit 130); others keep their trace."""
  done = subprocess.run([sys.executable, "-c", _RAISES, case], cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == code, done.stderr[-2000:]
  if one_line:
    assert done.stderr.strip() == one_line
  else:
    assert "Traceback" in done.stderr and "OSError: disk" in done.stderr


# Time: epoch i/N, compilation, validation, remaining time ----------------------------------


@pytest.mark.slow
def test_training_reports_time(trained_run):
  out = trained_run.result.stdout
  assert "starting a new run" in out and "2 epochs of 4 steps" in out
  assert "compiled the train step" in out
  assert "validating epoch 1 on" in out
  assert "epoch   1/2 loss" in out and "so far, about" in out  # Remaining time after epoch 1.
  assert "testing the best checkpoint" in out


# Config errors: one sentence, exit 2, before any data is read ------------------------


@pytest.mark.slow
def test_bad_config_numbers_are_refused_up_front(synthetic_data, tmp_path):
  result = _train(synthetic_data, "--config", "configs/toys.py:smoke", "--workdir",
                  str(tmp_path / "run"), "--config.train.batch_size=0",
                  "--config.data.max_len=0", "--config.sample.steps=99", separate_process=True)
  helpers.assert_user_error(result, "train.batch_size=0", "data.max_len=0", "sample.steps=99",
                            "--config.train.batch_size=")
  assert not (tmp_path / "run").exists()  # Nothing read, nothing written.


@pytest.mark.parametrize("flags, words", [
    (["--config", "configs/toys.py:smoke", "--config.train.batchsize=8"],
     ["batchsize", "did you mean", "batch_size"]),
    (["--config", "configs/toys.py:nosuch"], ["Unknown preset", "nosuch", "smoke"]),
    (["--config", "configs/toys.py:smoke", "--config.train.lr=1e-3"],
     ["'train.lr'", "did you mean 'train.learning_rate'"]),
])
def test_config_typos_are_one_line(synthetic_data, tmp_path, flags, words):
  result = _train(synthetic_data, *flags, "--workdir", str(tmp_path / "run"))
  helpers.assert_user_error(result, *words)
  assert len(result.stderr.strip().splitlines()) == 1


def test_verbose_shows_the_traceback(synthetic_data, tmp_path):
  result = _train(synthetic_data, "--config", "configs/toys.py:smoke", "--workdir",
                  str(tmp_path / "run"), "--config.train.batch_size=0", "--verbose")
  assert result.returncode != 0 and "Traceback" in result.stderr


# A workdir where nothing was trained takes a corrected config -------------------------------


@pytest.mark.slow
def test_failed_run_does_not_lock_its_workdir(synthetic_data, tmp_path):
  workdir = tmp_path / "run"
  failed = _train(synthetic_data, *helpers.cli_flags({"data.user_core": 100000}),
                  "--workdir", str(workdir))
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert (workdir / "config.json").exists()
  fixed = _train(synthetic_data, *helpers.cli_flags({"train.num_epochs": 1}), "--workdir",
                 str(workdir))
  assert fixed.returncode == 0, fixed.stderr[-3000:]
  assert "had no checkpoint: replaced its config.json" in fixed.stdout
  assert "data.user_core" in fixed.stdout and "starting a new run" in fixed.stdout
  assert json.loads((workdir / "config.json").read_text())["data"]["user_core"] != 100000


# A second process on a live workdir: exit 2, one line ---------------------------


def test_second_process_on_a_live_workdir_is_refused(synthetic_data, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with workdir_lib.Lock(str(workdir)):  # As a live training process holds it.
    result = _train(synthetic_data, *helpers.cli_flags(), "--workdir", str(workdir))
  helpers.assert_user_error(result, "in use by another training process", str(os.getpid()))
  with workdir_lib.Lock(str(workdir)):  # Released: a process that dies frees it too.
    pass


# A finished run is never written to --------------------------------------------------------


@pytest.mark.slow
def test_finished_read_only_workdir(trained_workdir, trained_run, synthetic_data, tmp_path):
  workdir = helpers.copy_workdir(trained_workdir, tmp_path / "run")
  flags = trained_run.flags[:-2]  # Without "--workdir W".
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.iterdir() if p.is_file()}
  for path in [workdir, *workdir.rglob("*")]:
    path.chmod(path.stat().st_mode & ~0o222)
  try:
    result = _train(synthetic_data, *flags, "--workdir", str(workdir))
  finally:
    for path in [workdir, *workdir.rglob("*")]:
      path.chmod(path.stat().st_mode | 0o200)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "already finished" in result.stdout
  after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.iterdir() if p.is_file()}
  assert after == before


# --help, TensorBoard, a learning-curve PNG -------------------------------------------------


def test_help_lists_presets_and_config_fields(synthetic_data):
  result = _train(synthetic_data, "--help")
  assert result.returncode == 0, result.stderr
  for text in ("--workdir", "smoke ", "v2_released", "train.batch_size = 1024",
               "Global batch", "sample.steps = 0"):
    assert text in result.stdout, text


@pytest.mark.slow
def test_plot_and_tensorboard_of_a_single_run(trained_workdir, synthetic_data, tmp_path):
  assert list(trained_workdir.glob("events.out.tfevents.*"))
  assert (trained_workdir / "figures" / "learning_curve.png").is_file()
  output = tmp_path / "curve.png"
  result = helpers.run_bin("plot.py", "--workdir", str(trained_workdir), "--output", str(output),
                           data_root=synthetic_data)
  assert result.returncode == 0, result.stderr[-3000:]
  assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_an_empty_workdir_is_one_line(synthetic_data, tmp_path):
  result = helpers.run_bin("plot.py", "--workdir", str(tmp_path), data_root=synthetic_data)
  helpers.assert_user_error(result, "no training record")


# Serving: --topk range, history excluded, columns, one warning ------------------------


def _histories(trained_workdir, path: pathlib.Path):
  with np.load(trained_workdir / "id_map.npz") as saved:
    items = [str(item) for item in saved["item_ids"][1:]]
  history = items[:6]
  path.write_text("user,item\n" + "".join(f"u1,{item}\n" for item in history)
                  + "u1,no-such-item\n")
  return history, len(items)


@pytest.mark.slow
@pytest.mark.parametrize("topk, words", [(0, ["--topk 0", "1 or more"]),
                                         (100000, ["--topk 100000", "fewer"])])
def test_topk_out_of_range(trained_workdir, synthetic_data, tmp_path, topk, words):
  _histories(trained_workdir, tmp_path / "h.csv")
  result = helpers.run_bin("infer.py", "--workdir", str(trained_workdir), "--input",
                           str(tmp_path / "h.csv"), "--output", str(tmp_path / "r.csv"),
                           "--topk", str(topk), data_root=synthetic_data)
  helpers.assert_user_error(result, *words)
  assert not (tmp_path / "r.csv").exists()


@pytest.mark.slow
def test_recommendations_exclude_history(trained_workdir, synthetic_data, tmp_path):
  history, num_items = _histories(trained_workdir, tmp_path / "h.csv")
  frames = {}
  for flag in ("--exclude_history", "--noexclude_history"):
    output = tmp_path / f"{flag}.csv"
    result = helpers.run_bin("infer.py", "--workdir", str(trained_workdir), "--input",
                             str(tmp_path / "h.csv"), "--output", str(output),
                             "--topk", str(num_items - 3), flag, data_root=synthetic_data)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "unknown item" in line]
    assert len(warnings) == 1, result.stderr  # Said once.
    frames[flag] = pl.read_csv(output, schema_overrides={"item": pl.String, "user": pl.String})
  excluded, included = frames["--exclude_history"], frames["--noexclude_history"]
  assert excluded.columns == ["user", "rank", "item", "score", "error"]  # As the README says.
  assert not set(excluded["item"]) & set(history)
  assert excluded.height == num_items - len(history)  # Fewer than K items were left.
  assert set(included["item"]) & set(history) and included.height == num_items - 3


# Self-contained: published figures ship with the package ------------------------------------


def test_published_results_ship_with_the_package(monkeypatch):
  monkeypatch.delenv("DIFFUREC_REFERENCE", raising=False)
  assert report.published_results("toys") and report.published_results("beauty")
  assert not report.published_source().startswith("/")
