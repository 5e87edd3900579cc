"""The trainer: bin/train.py end to end, kill-and-resume, model selection, bad runs.

The end-to-end test reads the session's one real `bin/train.py` run (helpers_train); the
library tests call `train_and_evaluate` in this process, where the compilation cache makes
the same tiny config cost a few seconds per run.
"""

import json
import math
import pathlib
import signal
import time

import pytest

import helpers_train as helpers
from helpers_train import synthetic_data, trained_run, trained_workdir  # noqa: F401  (fixtures)

from diffurec_jax import evaluate
from diffurec_jax.data import batches
from diffurec_jax.training import interrupt
from diffurec_jax.training import loop as train


# The end-to-end run -------------------------------------------------------------------------


@pytest.mark.slow
def test_train_entrypoint_writes_the_run(trained_run):
  result, workdir = trained_run.result, trained_run.workdir
  assert result.returncode == 0, result.stderr[-4000:]
  for name in ("config.json", "metrics.jsonl", "id_map.npz", "results.json", "test_ranks.npz"):
    assert (workdir / name).is_file(), name
  config = helpers.read_json(workdir / "config.json")
  assert config["model"]["hidden"] == 16 and config["train"]["num_epochs"] == 2
  results = helpers.read_json(workdir / "results.json")
  checkpoints = workdir / "checkpoints"
  assert sorted(p.name for p in (checkpoints / "latest").iterdir()) == ["1", "2"]
  assert [p.name for p in (checkpoints / "best").iterdir()] == [str(results["best_epoch"])]

  records = helpers.read_jsonl(workdir / "metrics.jsonl")
  for record in records:
    assert {"epoch", "split"} <= set(record), record
    assert record["split"] == "test" or "step" in record, record
  train_lines = [r for r in records if r["split"] == "train"]
  valid_lines = [r for r in records if r["split"] == "valid"]
  assert [r["epoch"] for r in train_lines] == [1, 2]
  assert [r["step"] for r in train_lines] == [4, 8]  # max_steps_per_epoch = 4.
  assert all(math.isfinite(r["loss"]) for r in train_lines)
  assert [r["epoch"] for r in valid_lines] == [1, 2]
  assert all(0.0 <= r["ndcg@10"] <= 1.0 for r in valid_lines)

  assert results["best_epoch"] in (1, 2)
  for split in ("valid", "test"):
    assert set(results[split]) == set(helpers.RESULT_KEYS)
    assert all(0.0 <= value <= 1.0 for value in results[split].values()), results[split]
  assert results["test"]["hit@5"] <= results["test"]["hit@10"] <= results["test"]["hit@20"]
  assert "test hit@5" in result.stdout  # The one-line test summary.


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so(trained_workdir, trained_run, synthetic_data):
  before = {name: (trained_workdir / name).read_bytes()
            for name in ("metrics.jsonl", "results.json")}
  start = time.time()
  result = helpers.run_bin("train.py", *trained_run.flags, data_root=synthetic_data)
  seconds = time.time() - start
  assert result.returncode == 0, result.stderr[-3000:]
  assert "already finished" in result.stdout
  assert seconds < 30  # No data preparation and no compilation: only the imports.
  assert {name: (trained_workdir / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_selection_on_validation_and_single_test(trained_workdir):
  helpers.assert_selection_consistent(trained_workdir)


# Resume and early stopping (library, in process) --------------------------------------------


def _results_core(results: dict) -> dict:
  return {k: results[k] for k in ("best_epoch", "valid", "test", "epochs_run")}


# eval_every 2: the killed epoch 1 was never validated, and must still have been saved.
@pytest.mark.parametrize("overrides", [{}, {"train.eval_every": 2}])
@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(synthetic_data, tmp_path, capsys, overrides):
  config = helpers.tiny_config(synthetic_data, overrides)
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "a"), progress=False)

  killed = tmp_path / "b"
  assert train.train_and_evaluate(config, str(killed), stop_after_epochs=1,
                                  progress=False) is None
  assert (killed / "checkpoints" / "latest" / "1").is_dir()
  assert not (killed / "results.json").exists()
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, str(killed), progress=False)
  assert "resuming from epoch 1 (step 4)" in capsys.readouterr().out

  assert _results_core(resumed) == _results_core(uninterrupted)
  on_disk = {name: _results_core(helpers.read_json(tmp_path / name / "results.json"))
             for name in ("a", "b")}
  assert on_disk["b"] == on_disk["a"]
  losses = {name: [(r["epoch"], r["step"], r["loss"])
                   for r in helpers.read_jsonl(tmp_path / name / "metrics.jsonl")
                   if r["split"] == "train"]
            for name in ("a", "b")}
  assert losses["b"] == losses["a"]  # Epoch 2 after the resume included, logged once each.
  helpers.assert_selection_consistent(killed)


_UNINTERRUPTED = {}


def _uninterrupted(config, tmp_path_factory) -> tuple[dict, pathlib.Path]:
  """The tiny run trained without interruption, once per module."""
  if "run" not in _UNINTERRUPTED:
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _UNINTERRUPTED["run"] = train.train_and_evaluate(config, str(workdir), progress=False), workdir
  return _UNINTERRUPTED["run"]


def _interrupt_with_sigint_at_build(monkeypatch, call: int):
  """A real SIGINT delivered while the trainer builds its `call`-th batch."""
  original, calls = batches.build, []

  def build(*args, **kwargs):
    calls.append(1)
    if len(calls) == call:
      signal.raise_signal(signal.SIGINT)
    return original(*args, **kwargs)

  monkeypatch.setattr(batches, "build", build)


def _interrupt_first_validation(monkeypatch):
  """Ctrl-C during the first validation (as the signal handler raises it there)."""
  original, calls = evaluate.Evaluator.evaluate, []

  def evaluate_split(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise interrupt.Interrupted("interrupted by SIGINT")
    return original(*args, **kwargs)

  monkeypatch.setattr(evaluate.Evaluator, "evaluate", evaluate_split)


# Mid-epoch (after 2 of 4 steps), by a real SIGINT (during step 3: it finishes), at an epoch boundary (step 4 =
# position 0 of epoch 2), and during validation: each resumes bit-identically.
@pytest.mark.parametrize("how", ["steps2", "sigint", "steps4", "validation"])
@pytest.mark.slow
def test_resume_after_interrupt_equals_uninterrupted_run(synthetic_data, tmp_path, tmp_path_factory,
                                                         capsys, monkeypatch, how):
  config = helpers.tiny_config(synthetic_data)
  uninterrupted, reference = _uninterrupted(config, tmp_path_factory)
  workdir = tmp_path / "run"
  handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in background
  with monkeypatch.context() as patch:
    stop_after_steps = {"steps2": 2, "steps4": 4}.get(how)
    if how == "sigint":
      _interrupt_with_sigint_at_build(patch, 3)
    if how == "validation":
      _interrupt_first_validation(patch)
    with pytest.raises(interrupt.Interrupted) as raised:
      train.train_and_evaluate(config, str(workdir), stop_after_steps=stop_after_steps,
                               progress=False)
  expected = {"steps2": "interrupted at epoch 1/2, step 2 of 4",
              "sigint": "interrupted at epoch 1/2, step 3 of 4",
              "steps4": "interrupted at epoch 2/2, step 0 of 4",
              "validation": "interrupted at epoch 1/2 after its last step"}[how]
  assert str(raised.value).startswith(expected), str(raised.value)
  assert "rerun the same command to resume" in str(raised.value)
  assert (workdir / "checkpoints" / "interrupted").is_dir()
  assert not (workdir / "results.json").exists()
  assert signal.getsignal(signal.SIGINT) is handler_before  # Handlers restored.
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, str(workdir), progress=False)
  out = capsys.readouterr().out
  assert "resuming from epoch" in out and "starting a new run" not in out

  assert _results_core(resumed) == _results_core(uninterrupted)
  records = {name: [(r["epoch"], r["step"], r["split"], r.get("loss"), r.get("ndcg@10"))
                    for r in helpers.read_jsonl(path / "metrics.jsonl") if r["split"] != "test"]
             for name, path in (("a", reference), ("b", workdir))}
  assert records["b"] == records["a"]  # Each record once, the partial epoch's loss included.
  wall = [r["wall_s"] for r in helpers.read_jsonl(workdir / "metrics.jsonl")]
  assert wall == sorted(wall)  # Seconds since the run started, across the interrupt.
  assert not any((workdir / "checkpoints" / "interrupted").glob("[0-9]*"))
  helpers.assert_selection_consistent(workdir)


def test_a_new_run_says_so(synthetic_data, tmp_path, capsys):
  config = helpers.tiny_config(synthetic_data, {"train.num_epochs": 1})
  train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  out = capsys.readouterr().out
  assert "starting a new run" in out and "1 epochs of 4 steps" in out
  assert "compiled the train step" in out  # Compilation is announced with its duration.
  assert "epoch   1/1 loss" in out and "so far" in out
  # Training draws nothing; bin/train.py writes figures/learning_curve.png (test_cli checks it).
  assert not (tmp_path / "run" / "figures").exists()
  assert list((tmp_path / "run").glob("events.out.tfevents.*"))  # TensorBoard.


@pytest.mark.slow
def test_early_stopping_when_validation_stops_improving(synthetic_data, tmp_path):
  # learning_rate 0 keeps the parameters, so validation repeats exactly and cannot improve:
  # with patience 1 the run stops after its second evaluation, whatever the data.
  config = helpers.tiny_config(synthetic_data, {"train.learning_rate": 0.0, "train.patience": 1,
                                           "train.eval_every": 1, "train.num_epochs": 4})
  results = train.train_and_evaluate(config, str(tmp_path), progress=False)
  records = helpers.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2]
  valid = [r for r in records if r["split"] == "valid"]
  assert [r["epoch"] for r in valid] == [1, 2]
  assert valid[0]["ndcg@10"] == valid[1]["ndcg@10"]
  assert results["best_epoch"] == 1 and results["epochs_run"] == 2
  helpers.assert_selection_consistent(tmp_path)


# Bad runs: one `error:` line, exit status 2 ------------------------------------------------


@pytest.mark.slow
def test_changed_config_on_existing_workdir_is_refused(trained_workdir, synthetic_data, tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "latest" / "1").mkdir(parents=True)  # Something was trained.
  (workdir / "config.json").write_bytes((trained_workdir / "config.json").read_bytes())
  result = helpers.run_bin("train.py", *helpers.cli_flags({"model.hidden": 32}),
                           "--workdir", str(workdir), data_root=synthetic_data)
  helpers.assert_user_error(result, "different config", "model.hidden")
  assert json.loads((workdir / "config.json").read_text())["model"]["hidden"] == 16


@pytest.mark.slow
def test_non_finite_loss_names_the_step(synthetic_data, tmp_path):
  flags = helpers.cli_flags({"train.learning_rate": 1e30, "train.warmup_epochs": 0.0,
                             "train.num_epochs": 1, "train.max_steps_per_epoch": 2})
  result = helpers.run_bin("train.py", *flags, "--workdir", str(tmp_path / "run"),
                           data_root=synthetic_data)
  helpers.assert_user_error(result, "at step 2", "train.learning_rate")
  assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_optimizer_fields_change_on_resume_and_are_recorded(synthetic_data, tmp_path, capsys):
  """The NaN advice works: a stopped run resumes with a lower lr and a gradient clip."""
  workdir = str(tmp_path / "run")
  config = helpers.tiny_config(synthetic_data, {"train.num_epochs": 2})
  assert train.train_and_evaluate(config, workdir, stop_after_epochs=1, progress=False) is None
  changed = helpers.tiny_config(synthetic_data, {"train.num_epochs": 2,
                                                 "train.learning_rate": 1e-4,
                                                 "train.grad_clip": 1.0})
  results = train.train_and_evaluate(changed, workdir, progress=False)
  assert results["epochs_run"] == 2
  assert "resuming with changed train.learning_rate 0.002 -> 0.0001" in capsys.readouterr().out
  (record,) = [r for r in helpers.read_jsonl(tmp_path / "run" / "metrics.jsonl")
               if r["split"] == "config"]
  assert record["epoch"] == 1 and record["changed"] == {
      "train.learning_rate": [0.002, 0.0001], "train.grad_clip": [0.0, 1.0]}
  saved = helpers.read_json(tmp_path / "run" / "config.json")["train"]
  assert (saved["learning_rate"], saved["grad_clip"]) == (1e-4, 1.0)


def test_a_signal_not_acted_on_soon_gets_a_notice(capsys, monkeypatch):
  """Ctrl-C while the main thread is busy (a compilation): one notice line at once; a signal
  acted on quickly (read at a step boundary) prints nothing."""
  monkeypatch.setattr(interrupt, "NOTICE_AFTER_S", 0.3)
  for busy, expected in ((1.0, 1), (0.0, 0)):
    with interrupt.Interrupts() as interrupts:
      interrupts.deferred = True
      signal.raise_signal(signal.SIGINT)
      time.sleep(busy)  # The handler has run; the run has not read `requested` yet.
      assert interrupts.requested
      time.sleep(0.5)
    err = capsys.readouterr().err
    assert err.count(interrupt.NOTICE) == expected, err


def test_an_interrupt_raised_inside_a_gc_callback_is_not_printed(capsys):
  import gc
  with interrupt.Interrupts() as interrupts:
    gc.callbacks.append(_raise_interrupted)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(_raise_interrupted)
    assert "Exception ignored" not in capsys.readouterr().err
    del interrupts


def _raise_interrupted(phase, info):
  del phase, info
  raise interrupt.Interrupted("interrupted by SIGINT")
