"""Several processes (jax.distributed over gloo on 127.0.0.1): bin/train.py in 2 processes of 1
CPU device each, stopped by a Ctrl-C that reached process 1 only and rerun, trains, validates
and tests exactly as 1 uninterrupted process of 2 devices; only process 0 writes the workdir.

Every run is `bin/train.py` itself, started by `_DRIVER`, which records what the test needs
and the entrypoint cannot say: the loss of every step, the files the process opened for
writing (an audit hook), and, with --signal_after_steps, a SIGINT the process sends itself
after that many steps (process 1 only: process 0 must learn of it by the stop vote).
Exactness: both runs execute the same program on two devices that hold the same rows; the
only cross-device reductions (loss, gradients, metric sums) add two partial values, and a
sum of two floats is the same whichever device adds it, so gloo's all-reduce gives the bits
of the in-process one. The tests therefore compare with ==, not a tolerance.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import helpers_train as helpers
from helpers_train import synthetic_data  # noqa: F401  (fixture)

from diffurec_jax.training import interrupt

_DRIVER = r"""
import dataclasses, json, os, runpy, signal, sys

out, workdir, signal_after = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
arguments = sys.argv[4:]
writes = []


def audit(event, args):  # Files this process creates, writes, renames or removes.
  if event == "open":
    path, mode, flags = args
    writing = (any(c in mode for c in "wax+") if isinstance(mode, str) else
               bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)))
    paths = [path] if writing else []
  elif event in ("os.rename", "os.replace"):
    paths = list(args[:2])
  elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
    paths = [args[0]]
  else:
    return
  for path in paths:
    if isinstance(path, (str, os.PathLike)):
      path = os.path.abspath(os.fspath(path))
      inside = os.path.relpath(path, workdir)
      # Orbax writes checkpoints from every process, coordinated: not the workdir's files.
      if not inside.startswith("..") and not inside.startswith("checkpoints"):
        writes.append(inside)


sys.addaudithook(audit)
from diffurec_jax.training import state as state_lib  # No device is touched by imports.

losses = []
build_run = state_lib.build_run


def recording_build_run(*args, **kwargs):
  setup = build_run(*args, **kwargs)
  step = setup.train_step

  def train_step(*step_args):
    state, loss = step(*step_args)
    losses.append(loss)
    import jax
    if len(losses) == signal_after and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGINT)
    return state, loss

  return dataclasses.replace(setup, train_step=train_step)


state_lib.build_run = recording_build_run
sys.argv = ["bin/train.py", *arguments]
code = 0
try:
  runpy.run_path("bin/train.py", run_name="__main__")
except SystemExit as done:
  code = done.code or 0
except BaseException:
  code = "exception"  # The traceback follows on stderr.
  raise
finally:
  import jax
  with open(out, "w") as f:
    json.dump({"code": code, "process": jax.process_index(), "devices": jax.device_count(),
               "losses": [float(loss) for loss in losses], "writes": sorted(set(writes))}, f)
"""

# Two epochs of 4 steps (helpers.TINY). Validation with the test's sampler: one compiled
# evaluation step instead of two. One more signal case would cost another run.
_CHANGES = {"train.valid_steps": 0}
_SIGNAL_AFTER = 5  # Process 1 is interrupted after step 5 (epoch 2): all stop at step 7.


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _environment(data_root, devices: int) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, DIFFUREC_DATA=str(data_root), JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", **helpers.COMPILATION_CACHE_ENV,
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
  for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(variable, None)
  return env


def _distributed_flags(processes: int) -> list[list[str]]:
  """Each process's --coordinator_address/--num_processes/--process_id ([[]] for one)."""
  if processes == 1:
    return [[]]
  address = f"127.0.0.1:{_free_port()}"
  return [[f"--coordinator_address={address}", f"--num_processes={processes}",
           f"--process_id={index}"] for index in range(processes)]


def _start(name: str, tmp: pathlib.Path, workdir: pathlib.Path, data_root, *,
           devices: int = 1, processes: int = 1, signal_after: int = 0,
           changes: dict = _CHANGES) -> list:
  """Starts bin/train.py (through _DRIVER) as `processes` processes of `devices` CPU devices."""
  env = _environment(data_root, devices)
  arguments = helpers.cli_flags(changes) + ["--workdir", str(workdir)]
  started = []
  for index, distributed in enumerate(_distributed_flags(processes)):
    out = tmp / f"{name}.{index}.json"
    process = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(out), str(workdir), str(signal_after),
         *arguments, *distributed], cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    started.append((process, out))
  return started


def _finish(started: list) -> list[dict]:
  """[report of each process]: its driver's JSON plus its stdout and stderr."""
  reports = []
  for process, out in started:
    try:
      stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for other, _ in started:
        other.kill()
      pytest.fail(f"{out.name}: no result in 240 s (a process waiting for another?)")
    assert out.exists(), f"{out.name} wrote no report:\n{stderr[-4000:]}"
    reports.append({**json.loads(out.read_text()), "stdout": stdout, "stderr": stderr})
  return reports


_CLOCK = {"time", "seconds", "wall_s", "examples_per_s", "compile_s"}


def _without_clock(record):
  """A record (or results.json value) without what depends on the clock."""
  if not isinstance(record, dict):
    return record
  return {k: v for k, v in record.items() if k not in _CLOCK}


def _records(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without what depends on the clock."""
  return [_without_clock(record) for record in helpers.read_jsonl(workdir / "metrics.jsonl")]


def _workdir_files(workdir: pathlib.Path) -> set[str]:
  return {str(path.relative_to(workdir)) for path in workdir.rglob("*")
          if path.is_file() and "checkpoints" not in path.parts
          and not path.name.startswith("events.out.tfevents")}  # Named after the host.


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data):
  """One uninterrupted process of 2 devices and, started with it (the compilations share the 2
  cores), 2 processes that process 1's SIGINT stops in epoch 2; then those 2 resumed. (A
  process other than 0 never reads JAX's compilation cache on CPU: every 2-process start
  compiles, hence one interrupted-and-resumed 2-process run, not a third one uninterrupted.)"""
  tmp = tmp_path_factory.mktemp("multiprocess")
  one, two = tmp / "one", tmp / "two"
  started = {"one": _start("one", tmp, one, synthetic_data, devices=2),
             "interrupted": _start("interrupted", tmp, two, synthetic_data, processes=2,
                                   signal_after=_SIGNAL_AFTER)}
  reports = {name: _finish(processes) for name, processes in started.items()}
  reports["resumed"] = _finish(_start("resumed", tmp, two, synthetic_data, processes=2))
  return {"one": one, "two": two}, reports


def _assert_exit(reports: list[dict], status: int = 0):
  for report in reports:
    assert report["code"] == status, report["stderr"][-4000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_of_two_devices(runs):
  """Per-step losses, validation and test metrics and every user's rank, exactly."""
  workdirs, reports = runs
  _assert_exit(reports["one"] + reports["resumed"])
  (one,), interrupted, resumed = reports["one"], reports["interrupted"], reports["resumed"]
  assert one["devices"] == 2 and [r["devices"] for r in resumed] == [2, 2]
  assert [r["process"] for r in resumed] == [0, 1]
  assert len(one["losses"]) == 8  # 2 epochs of 4 steps.
  for before, after in zip(interrupted, resumed):  # Each process saw every loss.
    assert before["losses"] + after["losses"] == one["losses"]
  assert _records(workdirs["two"]) == _records(workdirs["one"])  # Train, valid and test.
  results = [helpers.read_json(workdirs[name] / "results.json") for name in ("one", "two")]
  for key in ("best_epoch", "valid", "test", "test_all", "epochs_run"):
    assert _without_clock(results[1][key]) == _without_clock(results[0][key]), key
  with np.load(workdirs["one"] / "test_ranks.npz") as a, \
      np.load(workdirs["two"] / "test_ranks.npz") as b:
    assert set(a.files) == set(b.files)
    for name in a.files:  # Every user's rank, gathered from both processes.
      np.testing.assert_array_equal(b[name], a[name])
  assert "test hit@5" in resumed[0]["stdout"] and "test hit@5" not in resumed[1]["stdout"]


@pytest.mark.slow
def test_ctrl_c_in_one_process_stops_both_and_the_rerun_resumes(runs):
  """Process 1's SIGINT stops both at the same step, with the partial epoch saved; the rerun
  resumes there (its numbers are the uninterrupted run's: the test above)."""
  _, reports = runs
  interrupted, resumed = reports["interrupted"], reports["resumed"]
  _assert_exit(interrupted, interrupt.EXIT_STATUS)
  for report in interrupted:
    lines = [line for line in report["stderr"].splitlines() if line.startswith("interrupted")]
    assert lines == ["interrupted at epoch 2/2, step 3 of 4; rerun the same command to "
                     "resume"], report["stderr"][-3000:]
  # Both stop StopVote.LAG steps after the boundary where process 1 first voted to stop.
  assert [len(r["losses"]) for r in interrupted] == [_SIGNAL_AFTER + interrupt.StopVote.LAG] * 2
  _assert_exit(resumed)
  assert "resuming from epoch 1 (step 7), 3 of 4 steps into epoch 2" in resumed[0]["stdout"]
  assert [len(r["losses"]) for r in resumed] == [1, 1]


@pytest.mark.slow
def test_only_process_zero_writes_the_workdir(runs):
  workdirs, reports = runs
  interrupted, resumed = reports["interrupted"], reports["resumed"]
  _assert_exit(resumed)
  assert {"config.json", "metrics.jsonl", "id_map.npz"} <= set(interrupted[0]["writes"])
  assert {"metrics.jsonl", "results.json", "test_ranks.npz"} <= set(resumed[0]["writes"])
  assert interrupted[1]["writes"] == [] and resumed[1]["writes"] == []  # Checkpoints aside.
  assert _workdir_files(workdirs["two"]) == _workdir_files(workdirs["one"])
  for which in ("latest", "best"):  # Both processes saved into the same checkpoints.
    assert (sorted(p.name for p in (workdirs["two"] / "checkpoints" / which).iterdir())
            == sorted(p.name for p in (workdirs["one"] / "checkpoints" / which).iterdir()))
  assert not list((workdirs["two"] / "checkpoints" / "interrupted").iterdir())  # Deleted.


# The item table sharded across the processes ------------------------------------------------

# catalog.shards = 2 on 2 devices: mesh data 1 x items 2, so with 2 processes each holds half of
# the table and of its Adam moments (and saves that half into the shared checkpoint), and the
# blockwise CE, ranks and top-K combine the halves across processes.
_SHARDED_CHANGES = {**_CHANGES, "catalog.shards": 2, "catalog.block": 7}


def _recommend(workdir: pathlib.Path, histories: pathlib.Path, output: pathlib.Path,
               data_root, *, devices: int, processes: int) -> list:
  """bin/infer.py --input in `processes` processes of `devices` devices: [CompletedProcess]."""
  env = _environment(data_root, devices)
  command = [sys.executable, "bin/infer.py", "--workdir", str(workdir), "--input",
             str(histories), "--output", str(output), "--topk", "6"]
  started = [subprocess.Popen(command + distributed, cwd=helpers.REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for distributed in _distributed_flags(processes)]
  done = []
  for process in started:
    try:
      stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for other in started:
        other.kill()
      pytest.fail("bin/infer.py: no result in 240 s (a process waiting for another?)")
    done.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
  return done


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, synthetic_data):
  """The same item-sharded run in 1 process of 2 devices and in 2 processes of 1, started
  together; then each serves the same histories the same way."""
  tmp = tmp_path_factory.mktemp("sharded")
  workdirs = {"one": tmp / "one", "two": tmp / "two"}
  started = {"one": _start("one", tmp, workdirs["one"], synthetic_data, devices=2,
                           changes=_SHARDED_CHANGES),
             "two": _start("two", tmp, workdirs["two"], synthetic_data, processes=2,
                           changes=_SHARDED_CHANGES)}
  reports = {name: _finish(processes) for name, processes in started.items()}
  histories = tmp / "histories.csv"
  histories.write_text("user,item,timestamp\n" + "".join(
      f"{user},i{item},{time}\n" for user, items in
      [("a", [3, 5, 7]), ("b", [11]), ("c", [0, 39, 20, 21, 22]), ("d", [8, 9])]
      for time, item in enumerate(items)))
  served = {name: _recommend(workdirs[name], histories, tmp / f"{name}.csv", synthetic_data,
                             devices=devices, processes=processes)
            for name, devices, processes in (("one", 2, 1), ("two", 1, 2))}
  return workdirs, reports, served, tmp


@pytest.mark.slow
def test_item_sharded_training_across_processes_equals_one_process(sharded_runs):
  workdirs, reports, _, _ = sharded_runs
  _assert_exit(reports["one"] + reports["two"])
  (one,), two = reports["one"], reports["two"]
  assert [r["devices"] for r in two] == [2, 2] and [r["process"] for r in two] == [0, 1]
  assert len(one["losses"]) == 8
  for report in two:  # Each process saw every loss; the item halves combine exactly.
    assert report["losses"] == one["losses"]
  assert _records(workdirs["two"]) == _records(workdirs["one"])
  results = [helpers.read_json(workdirs[name] / "results.json") for name in ("one", "two")]
  for key in ("best_epoch", "valid", "test", "test_all", "epochs_run"):
    assert _without_clock(results[1][key]) == _without_clock(results[0][key]), key
  with np.load(workdirs["one"] / "test_ranks.npz") as a, \
      np.load(workdirs["two"] / "test_ranks.npz") as b:
    for name in a.files:
      np.testing.assert_array_equal(b[name], a[name])
  assert two[1]["writes"] == []


@pytest.mark.slow
def test_item_sharded_serving_across_processes_equals_one_process(sharded_runs):
  """bin/infer.py restores the half tables from the checkpoint in 2 processes and recommends
  what 1 process of 2 devices does; process 0 alone prints and writes."""
  _, _, served, tmp = sharded_runs
  for finished in served["one"] + served["two"]:
    assert finished.returncode == 0, finished.stderr[-3000:]
  # Process 1 prints nothing of ours (gloo's own connection line aside).
  assert not [line for line in served["two"][1].stdout.splitlines()
              if not line.startswith("[Gloo]")], served["two"][1].stdout
  summary = json.loads(served["two"][0].stdout.strip().splitlines()[-1])
  assert summary["users"] == 4 and summary["output"] == str(tmp / "two.csv")
  one, two = ((tmp / f"{name}.csv").read_text() for name in ("one", "two"))
  assert two == one
  assert len(one.splitlines()) == 1 + 4 * 6  # A header and 6 items for each user.


# The full chain of the steps curve (lab/steps_curve.py) on the item-sharded workdir: its
# table restored and placed over the 2 devices the run trained on.
_CURVE = r"""
import json, sys
import numpy as np
from diffurec_jax.lab import steps_curve

workdir = sys.argv[1]
with open(workdir + "/config.json") as f:
  steps = json.load(f)["model"]["diffusion_steps"]
curve = steps_curve.steps_curve(workdir, ks=(steps,), samplers=("reverse",), seeds=1,
                                progress=False, one_step=False, keep_ranks=True)
(row,) = curve["rows"]
print(json.dumps({"users": np.asarray(curve["users"]).tolist(),
                  "ranks": np.asarray(row["ranks"][0]).tolist()}))
"""


@pytest.mark.slow
def test_steps_curve_of_an_item_sharded_run(sharded_runs, synthetic_data):
  """The curve's full reverse chain ranks every test user as the run's own test did."""
  workdirs, _, _, _ = sharded_runs
  done = subprocess.run([sys.executable, "-c", _CURVE, str(workdirs["one"])],
                        env=_environment(synthetic_data, 2), cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  with np.load(workdirs["one"] / "test_ranks.npz") as saved:
    np.testing.assert_array_equal(got["users"], saved["users"])
    np.testing.assert_array_equal(got["ranks"], saved["ranks"])
