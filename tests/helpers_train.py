"""Shared runs and utilities of the trainer, inference and multi-device tests.

A jit compile costs 5-15 s on 2 CPU cores and a fresh interpreter 3-5 s to import jax, so
these tests share work:
- one persistent XLA compilation cache for the session, used by this process and by every
  subprocess, so the same train and eval steps compile once in all;
- the bin/ scripts run in this process (`run_script`), except where only a real process
  shows the behaviour (exit status as the shell sees it, signals);
- one synthetic dataset (`SYNTHETIC_LOG`), so nothing here needs downloaded data;
- one real `bin/train.py` run on it (`trained_run`), read by the end-to-end,
  inference and bad-input tests (tests that damage a workdir copy it first).

The tiny config is defined once (`TINY`) and given either to the library (`tiny_config`) or to
the entrypoints as flags (`cli_flags`), so in-process and subprocess runs are the same run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import numpy as np
import pytest
from absl import flags

from diffurec_jax import cli  # noqa: F401  (defines --verbose once, before any script runs)
from diffurec_jax import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULT_KEYS = metrics.RESULT_KEYS

# The smoke preset shrunk further. max_len 8 equals the preset's only length bucket, so every
# step has one shape and compiles once; T stays 32 (the trunc_lin schedule needs T >= 21).
TINY = {
    "data.max_users": 150,
    "data.max_len": 8,
    "data.download": False,
    "model.hidden": 16,
    "model.num_blocks": 1,
    "model.diffusion_steps": 32,
    "train.num_epochs": 2,
    "train.max_steps_per_epoch": 4,
    "train.batch_size": 32,
    "train.eval_batch_size": 64,
}


def _setup_compilation_cache() -> dict[str, str]:
  """Persistent compilation cache in a session tmp dir; env vars that share it with children."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not directory:
    directory = tempfile.mkdtemp(prefix="diffurec-jit-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
  # Must happen before this process compiles anything (helpers are imported at collection).
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return {"JAX_COMPILATION_CACHE_DIR": directory,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


COMPILATION_CACHE_ENV = _setup_compilation_cache()


def require_toys(data_root: pathlib.Path):
  if not (data_root / "toys").is_dir():
    pytest.skip(f"No Toys data under {data_root}.")


def write_synthetic_log(path: pathlib.Path, num_users: int = 150, num_items: int = 40,
                        seed: int = 0) -> pathlib.Path:
  """A long-format log (user,item,timestamp) with a learnable order: each user walks the items
  in strides of 1-3 from a random start, a fifth of the steps replaced by a random item."""
  rng = np.random.default_rng(seed)
  rows = ["user,item,timestamp"]
  for user in range(num_users):
    length = int(rng.integers(6, 16))
    items = (rng.integers(num_items) + rng.integers(1, 4) * np.arange(length)) % num_items
    noisy = rng.random(length) < 0.2
    items[noisy] = rng.integers(num_items, size=int(noisy.sum()))
    rows += [f"u{user},i{item},{1000 + t}" for t, item in enumerate(items)]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(rows) + "\n")
  return path


# The session's dataset: synthetic, so every trained-run test runs without downloaded data.
SYNTHETIC_DIR = pathlib.Path(tempfile.mkdtemp(prefix="diffurec-synthetic-"))
atexit.register(shutil.rmtree, SYNTHETIC_DIR, ignore_errors=True)
SYNTHETIC_LOG = write_synthetic_log(SYNTHETIC_DIR / "log.csv")


@pytest.fixture(scope="session")
def synthetic_data() -> pathlib.Path:
  """The folder of the session's synthetic log (the data root of the tiny runs)."""
  return SYNTHETIC_DIR


def tiny_config(data_root: pathlib.Path = SYNTHETIC_DIR, changes: dict | None = None,
                preset: str = "smoke"):
  """configs/custom.py:<preset> on the synthetic log with TINY, then `changes` applied."""
  spec = importlib.util.spec_from_file_location("custom_config", REPO / "configs" / "custom.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset)
  for name, value in {**TINY, **(changes or {})}.items():
    section, field = name.split(".")
    setattr(config[section], field, value)
  config.data.path = str(SYNTHETIC_LOG)
  config.data.root = str(data_root)  # The prepared-data cache comes from $DIFFUREC_CACHE.
  return config


def cli_flags(changes: dict | None = None, preset: str = "smoke") -> list[str]:
  """The same config as `tiny_config(changes=changes, preset=preset)`, as bin/ flags."""
  flags = ["--config", f"configs/custom.py:{preset}", f"--config.data.path={SYNTHETIC_LOG}",
           f"--config.data.root={SYNTHETIC_DIR}"]
  for name, value in {**TINY, **(changes or {})}.items():
    flags.append(f"--config.{name}={value}")
  return flags


@dataclasses.dataclass(frozen=True)
class Finished:
  """What a finished command left: exit status, stdout and stderr (as subprocess.run gives)."""
  returncode: int
  stdout: str
  stderr: str


def run_bin(script: str, *args: str, data_root: pathlib.Path, env: dict | None = None,
            timeout: float = 300, separate_process: bool = False) -> Finished:
  """bin/<script> with the real data, the session caches and `env`.

  In this process by default (`run_script`: no interpreter start, no jax import, warm
  compiled programs); `separate_process=True` for what only a real process shows (exit
  status as the shell sees it, signals, a fresh interpreter).
  """
  full_env = {"DIFFUREC_DATA": str(data_root), **COMPILATION_CACHE_ENV, **(env or {})}
  if not separate_process:
    return run_script(f"bin/{script}", *args, env=full_env)
  done = subprocess.run([sys.executable, str(REPO / "bin" / script), *args], cwd=REPO,
                        env=dict(os.environ, **full_env), capture_output=True, text=True,
                        timeout=timeout)
  return Finished(done.returncode, done.stdout, done.stderr)


def run_script(path: str, *args: str, env: dict | None = None,
               cwd: pathlib.Path | None = None) -> Finished:
  """Runs the script at REPO/`path` (bin/ or bench/) in this process, as `python path args`
  run in `cwd` (default: the repository).

  Its absl flags are defined for the call and removed after it; `env` values of None unset a
  variable; SystemExit becomes the exit status, an uncaught exception status 1 with its
  traceback on stderr, as the interpreter would do.
  """
  source = REPO / path
  defined = set(flags.FLAGS)
  out, err = io.StringIO(), io.StringIO()
  saved_argv = sys.argv
  with pytest.MonkeyPatch.context() as patch:
    for name, value in (env or {}).items():
      if value is None:
        patch.delenv(name, raising=False)
      else:
        patch.setenv(name, str(value))
    patch.chdir(cwd or REPO)
    try:
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = _exit_status(lambda: _execute(source, list(args)), err)
    finally:
      sys.argv = saved_argv
      for name in set(flags.FLAGS) - defined:
        delattr(flags.FLAGS, name)
      flags.FLAGS.unparse_flags()
  return Finished(returncode, out.getvalue(), err.getvalue())


def _execute(source: pathlib.Path, args: list[str]):
  """`python source args`: the module runs as __main__, its main block included."""
  sys.argv = [str(source), *args]
  flags.FLAGS.unparse_flags()
  runpy.run_path(str(source), run_name="__main__")


def _exit_status(function, err) -> int:
  try:
    function()
  except SystemExit as done:
    if done.code is None or isinstance(done.code, int):
      return done.code or 0
    print(done.code, file=err)
    return 1
  except Exception:  # As the interpreter: the traceback on stderr, status 1.
    traceback.print_exc(file=err)
    return 1
  return 0


def assert_user_error(result: Finished, *words: str):
  """Exit status 2, one `error:` line naming `words`, and no traceback."""
  report = f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
  assert result.returncode == 2, report
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, report
  for word in words:
    assert word in errors[0], f"{word!r} not in {errors[0]!r}"
  assert "Traceback" not in result.stderr, report


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def assert_selection_consistent(workdir: pathlib.Path, metric: str = "ndcg@10"):
  """best_epoch is the first epoch of maximal validation `metric`; test ran once, on it."""
  records = read_jsonl(workdir / "metrics.jsonl")
  results = read_json(workdir / "results.json")
  valid = [r for r in records if r["split"] == "valid"]
  tests = [r for r in records if r["split"] == "test"]
  best = max(valid, key=lambda r: r[metric])  # max() keeps the first of equal values.
  assert results["best_epoch"] == best["epoch"]
  assert results["valid"] == {k: best[k] for k in RESULT_KEYS}
  assert len(tests) == 1 and tests[0]["epoch"] == best["epoch"]
  assert results["test"] == {k: tests[0][k] for k in RESULT_KEYS}


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished bin/train.py run: its workdir, flags, process result and wall time."""
  workdir: pathlib.Path
  flags: list[str]
  result: Finished
  seconds: float


_SHARED: dict[str, TrainedRun] = {}


def shared_run(tmp_path_factory) -> TrainedRun:
  """The session's one real training run, started by the first test that needs it."""
  if "run" not in _SHARED:
    workdir = tmp_path_factory.mktemp("trained") / "run"
    flags = cli_flags() + ["--workdir", str(workdir)]
    start = time.time()
    result = run_bin("train.py", *flags, data_root=SYNTHETIC_DIR)
    _SHARED["run"] = TrainedRun(workdir, flags, result, time.time() - start)
  return _SHARED["run"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
  """The shared bin/train.py run (may have failed: the end-to-end test reports how)."""
  return shared_run(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_workdir(trained_run) -> pathlib.Path:
  """The shared run's workdir, read-only; errors the test if training failed."""
  if trained_run.result.returncode != 0:
    pytest.fail(f"bin/train.py failed (exit {trained_run.result.returncode}):\n"
                f"{trained_run.result.stderr[-3000:]}")
  return trained_run.workdir


def copy_workdir(source: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
  shutil.copytree(source, destination)
  return destination
