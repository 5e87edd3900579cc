"""Shared runs and utilities of the trainer, inference and multi-device tests.

A jit compile costs 5-15 s on 2 CPU cores, so these tests share work:
- one persistent XLA compilation cache for the session, used by this process and by every
  subprocess, so the same train and eval steps compile once in all;
- one real `bin/train.py` run on a tiny slice of Toys (`trained_run`), read by the end-to-end,
  inference and bad-input tests (tests that damage a workdir copy it first).

The tiny config is defined once (`TINY`) and given either to the library (`tiny_config`) or to
the entrypoints as flags (`cli_flags`), so in-process and subprocess runs are the same run.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import pytest

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


def tiny_config(data_root: pathlib.Path, changes: dict | None = None, preset: str = "smoke"):
  """configs/toys.py:<preset> with TINY, then `changes` ({'train.patience': 1, ...}) applied."""
  require_toys(data_root)
  spec = importlib.util.spec_from_file_location("toys_config", REPO / "configs" / "toys.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset)
  for name, value in {**TINY, **(changes or {})}.items():
    section, field = name.split(".")
    setattr(config[section], field, value)
  config.data.root = str(data_root)  # The prepared-data cache comes from $DIFFUREC_CACHE.
  return config


def cli_flags(changes: dict | None = None, preset: str = "smoke") -> list[str]:
  """The same config as `tiny_config(data_root, changes, preset)`, as bin/ flags."""
  flags = ["--config", f"configs/toys.py:{preset}"]
  for name, value in {**TINY, **(changes or {})}.items():
    flags.append(f"--config.{name}={value}")
  return flags


def run_bin(script: str, *args: str, data_root: pathlib.Path, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs bin/<script> in the repo with the real data, the session caches and `env`."""
  full_env = dict(os.environ, DIFFUREC_DATA=str(data_root), **COMPILATION_CACHE_ENV)
  full_env.update(env or {})
  return subprocess.run([sys.executable, str(REPO / "bin" / script), *args], cwd=REPO,
                        env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *words: str):
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
  result: subprocess.CompletedProcess
  seconds: float


_SHARED: dict[str, TrainedRun] = {}


def shared_run(tmp_path_factory, data_root) -> TrainedRun:
  """The session's one real training run, started by the first test that needs it."""
  if "run" not in _SHARED:
    require_toys(data_root)
    workdir = tmp_path_factory.mktemp("trained") / "run"
    flags = cli_flags() + ["--workdir", str(workdir)]
    start = time.time()
    result = run_bin("train.py", *flags, data_root=data_root)
    _SHARED["run"] = TrainedRun(workdir, flags, result, time.time() - start)
  return _SHARED["run"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_root) -> TrainedRun:
  """The shared bin/train.py run (may have failed: the end-to-end test reports how)."""
  return shared_run(tmp_path_factory, data_root)


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
