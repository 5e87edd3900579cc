"""The campaign of issue 18: the plan, each row's status, the grid pick, the budget, the ledger."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffurec_jax.lab import campaign
from diffurec_jax.lab import campaign_status
from diffurec_jax.lab import plan as plan_lib
from diffurec_jax.lab import experiment
from diffurec_jax.lab import ledger
from diffurec_jax.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW = """
[[row]]
dataset = "toys"
name = "diffurec"
seed = 0
kind = "run"
config = "configs/toys.py:diffurec"
overrides = ["--config.train.patience=20"]
estimate_min = 55
notes = "the default recipe"
"""

GRID = """
[[row]]
dataset = "toys"
name = "sasrec_d0.2"
seed = 0
kind = "trial"
config = "configs/toys.py:sasrec"
overrides = ["--config.model.dropout=0.2", "--config.train.learning_rate=2e-3"]
grid = "sasrec grid"
estimate_min = 60
notes = "cell a"

[[row]]
dataset = "toys"
name = "sasrec_d0.5"
seed = 0
kind = "trial"
config = "configs/toys.py:sasrec"
overrides = ["--config.model.dropout=0.5"]
grid = "sasrec grid"
estimate_min = 60
notes = "cell b"

[[row]]
dataset = "toys"
name = "sasrec"
seed = 1
kind = "run"
after = "sasrec grid"
estimate_min = 60
notes = "tuned"
"""


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
  """Plans name configs/<dataset>.py relative to the repository, as bin/campaign.py runs."""
  monkeypatch.chdir(ROOT)


def write_plan(tmp_path, text):
  path = tmp_path / "plan.toml"
  path.write_text(text)
  return str(path)


def fake_workdir(path, row, *, valid_ndcg=0.05, finished=True, changes=None):
  """A workdir of `row`'s recipe as train.py leaves it (see tests/test_ledger.py)."""
  os.makedirs(path, exist_ok=True)
  config_path, presets = experiment.split_config_arg(row.config)
  config = experiment.load_config_module(config_path).get_config(presets or None)
  for field, value in dict(row.expect, seed=row.seed, **(changes or {})).items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json())
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for epoch in (1, 2):
      f.write(json.dumps({"epoch": epoch, "split": "train", "loss": 9.0, "wall_s": 60.0 * epoch})
              + "\n")
      f.write(json.dumps({"epoch": epoch, "split": "valid", "ndcg@10": valid_ndcg,
                          "wall_s": 60.0 * epoch + 5}) + "\n")
  os.makedirs(os.path.join(path, "checkpoints", "latest", "2"))
  if finished:
    with open(os.path.join(path, "results.json"), "w") as f:
      json.dump({"best_epoch": 2, "epochs_run": 2, "valid": {"ndcg@10": valid_ndcg},
                 "test": {"hit@10": 0.08, "ndcg@10": 0.04}, "wall_s": 150.0}, f)
  return path


# The plan ----------------------------------------------------------------------------------


def test_a_row_parses_with_typed_expectations(tmp_path):
  (row,) = plan_lib.load_plan(write_plan(tmp_path, ROW))
  assert (row.dataset, row.name, row.seed, row.kind, row.device) == (
      "toys", "diffurec", 0, "run", "cpu")
  assert dict(row.expect) == {"variant": "diffurec", "train.patience": 20,
                              "train.batch_size": 512, "data.max_len": 50}
  (_, cell, _) = plan_lib.load_plan(write_plan(tmp_path, GRID))
  assert {"variant": "sasrec", "model.dropout": 0.5, "model.hidden": 64}.items() <= dict(
      cell.expect).items()


@pytest.mark.parametrize("text, message", [
    (ROW.replace("seed = 0", "seeds = [0]"), "unknown field 'seeds'"),
    (ROW.replace("estimate_min = 55", ""), "missing field 'estimate_min'"),
    (ROW.replace('config = "configs/toys.py:diffurec"', ""), "missing field 'config'"),
    (ROW + ROW, "duplicate row toys diffurec seed0"),
    (ROW.replace("configs/toys.py", "configs/nowhere.py"), "does not exist"),
    (ROW.replace('dataset = "toys"', 'dataset = "beauty"'), "is the 'toys' config, not 'beauty'"),
    (ROW.replace(":diffurec", ":diffurec,fast"), "Unknown preset"),
    (ROW.replace('kind = "run"', 'kind = "final"'), "kind 'final'"),
    (ROW.replace("seed = 0", 'seed = "0"'), "'seed' = '0' has the wrong type"),
    (ROW.replace("patience=20", "patiense=20"), "names no config field"),
    (ROW.replace("patience=20", "patience=many"), "is not a int"),
    (ROW.replace("--config.train.patience=20", "train.patience=20"), "is not --config.<field>="),
    (ROW.replace("train.patience=20", "seed=1"), "the row's `seed` field"),
    (ROW.replace("estimate_min = 55", 'estimate_min = 55\ndevice = "tpu"'), "device 'tpu'"),
    (ROW.replace("estimate_min = 55", 'estimate_min = 55\nafter = "grid"'), "remove config"),
    (GRID.replace('grid = "sasrec grid"', 'grid = "other"'), "no toys row has grid"),
    (ROW.replace("[[row]]", "[row]"), "must hold [[row]] tables"),
    ("title = 'x'\n" + ROW, "found ['title']"),
    (ROW.replace('notes = "the default recipe"', "notes = "), "is not valid TOML"),
    (ROW + 'evaluations = [{label = "x", args = ["--workdir=y"]}]\n', "'--workdir=y' is not one of"),
    (ROW + 'evaluations = [{args = ["--steps=1"]}]\n', "each evaluation is"),
    (ROW + 'evaluations = [{label = "x", args = "--steps=1"}]\n', "each evaluation is"),
    (ROW + 'evaluations = [{label = "x", args = ["--steps=1"]}, {label = "x", args = []}]\n',
     "two evaluations share a label"),
    (ROW + 'evaluations = "1 step"\n', "has the wrong type"),
])
def test_a_malformed_plan_is_one_clear_error(tmp_path, text, message):
  with pytest.raises(plan_lib.CampaignError, match=message.replace("[", r"\[").replace(
      "(", r"\(")) as error:
    plan_lib.load_plan(write_plan(tmp_path, text))
  assert "\n" not in str(error.value)


EVALUATIONS = ('evaluations = [{label = "1 reverse step (test)", args = ["--steps=1"]},\n'
               '  {label = "lambda = 0 (test)", args = ["--steps=32", "--lambda0"]}]\n')


def test_evaluations_parse_into_ledger_commands(tmp_path):
  (row,) = plan_lib.load_plan(write_plan(tmp_path, ROW + EVALUATIONS))
  assert row.evaluations == (plan_lib.Evaluation("1 reverse step (test)", ("--steps=1",)),
                             plan_lib.Evaluation("lambda = 0 (test)", ("--steps=32", "--lambda0")))
  assert plan_lib.evaluation_command(row, row.evaluations[1], "runs") == [
      "python", "bin/ledger.py", "evaluate", "--workdir", "runs/toys_diffurec_seed0", "--label",
      "lambda = 0 (test)", "--steps=32", "--lambda0"]
  (plain,) = plan_lib.load_plan(write_plan(tmp_path, ROW))
  assert plain.evaluations == ()


def test_the_command_adds_the_seed_after_the_config():
  row = plan_lib.Row("toys", "v1", 2, "run", 75.0, "", config="configs/toys.py:v1",
                     overrides=("--config.data.max_len=50",))
  assert plan_lib.command_text(row, "runs") == (
      "python bin/train.py --config configs/toys.py:v1 --config.seed=2 "
      "--config.data.max_len=50 --workdir runs/toys_v1_seed2")
  seed0 = plan_lib.Row("toys", "diffurec", 0, "run", 55.0, "", config="configs/toys.py")
  assert plan_lib.command(seed0, "r") == [
      "python", "bin/train.py", "--config", "configs/toys.py", "--workdir", "r/toys_diffurec_seed0"]


# Status ------------------------------------------------------------------------------------


def states(rows, root, runs):
  return [(s.row.name, s.row.seed, s.state) for s in campaign_status.statuses(rows, root, runs)]


def test_status_classifies_every_state(tmp_path):
  rows = plan_lib.load_plan(write_plan(tmp_path, "\n".join(
      ROW.replace("seed = 0", f"seed = {seed}") for seed in range(7)) + ROW.replace(
          "seed = 0", 'seed = 7\ndevice = "gpu"')))
  root, runs = str(tmp_path / "results"), str(tmp_path / "runs")
  ledger_entry = fake_workdir(rows[0].ledger_dir(root), rows[0])  # 0: done
  os.remove(os.path.join(ledger_entry, "results.json"))  # a trial-like entry is done too
  fake_workdir(rows[1].workdir(runs), rows[1], finished=False)  # 1: running
  fake_workdir(rows[2].workdir(runs), rows[2], finished=False)  # 2: partial
  fake_workdir(rows[3].workdir(runs), rows[3])  # 3: finished, not in the ledger
  fake_workdir(rows[4].ledger_dir(root), rows[4], changes={"train.patience": 5})  # 4: conflict
  fake_workdir(rows[5].workdir(runs), rows[5], finished=False,
               changes={"variant": "v1"})  # 5: a workdir of another recipe: conflict
  with workdir_lib.Lock(rows[1].workdir(runs)):
    result = campaign_status.statuses(rows, root, runs)
  assert [s.state for s in result] == ["done", "running", "partial", "finished", "conflict",
                                       "conflict", "missing", "gpu"]
  assert f"pid {os.getpid()}" in result[1].detail
  assert "epoch 2/20, 2 min trained" in result[2].detail
  assert result[2].remaining_min == pytest.approx(55 - 125 / 60)
  assert "train.patience 5, the plan says 20" in result[4].detail
  assert campaign_status.lock_owner(rows[1].workdir(runs)) is None  # Released with the lock.
  table = campaign_status.status_table(result, runs)
  assert "totals: 1 done, 1 running, 1 partial, 1 finished, 2 conflict, 1 missing, 1 gpu" in table
  assert "python bin/train.py --config configs/toys.py:diffurec --config.seed=7" in table


def test_resumable_fields_are_not_conflicts(tmp_path):
  (row,) = plan_lib.load_plan(write_plan(tmp_path, ROW.replace(
      '"--config.train.patience=20"',
      '"--config.train.patience=20", "--config.train.num_epochs=300"')))
  folder = fake_workdir(str(tmp_path / "entry"), row, changes={"train.num_epochs": 56})
  assert campaign_status.recipe_differences(row, folder) == []


def test_a_preset_is_part_of_the_recipe(tmp_path):
  (plain,) = plan_lib.load_plan(write_plan(tmp_path, ROW))
  (lambda0,) = plan_lib.load_plan(write_plan(tmp_path, ROW.replace(":diffurec", ":lambda0")))
  assert dict(lambda0.expect)["model.lambda_mean"] == 0.0
  folder = fake_workdir(str(tmp_path / "entry"), plain)
  assert campaign_status.recipe_differences(lambda0, folder)[0].startswith("model.lambda_mean 0.001")


# The tuning grid ---------------------------------------------------------------------------


def test_tuned_rows_wait_for_the_grid_then_take_its_best_cell(tmp_path):
  rows = plan_lib.load_plan(write_plan(tmp_path, GRID))
  root, runs = str(tmp_path / "results"), str(tmp_path / "runs")
  fake_workdir(rows[0].ledger_dir(root), rows[0], valid_ndcg=0.052)
  assert states(rows, root, runs)[2] == ("sasrec", 1, "waiting")
  fake_workdir(rows[1].workdir(runs), rows[1], valid_ndcg=0.049)  # finished, not in the ledger
  pick = campaign_status.grid_pick(rows, "toys", "sasrec grid", root, runs)
  assert (pick.cell.name, pick.ndcg, pick.finished) == ("sasrec_d0.2", 0.052, 2)
  tuned = campaign_status.classify(rows[2], rows, root, runs)
  assert tuned.state == "missing"
  assert plan_lib.command_text(tuned.row, runs).endswith(
      "--config configs/toys.py:sasrec --config.seed=1 --config.model.dropout=0.2 "
      f"--config.train.learning_rate=2e-3 --workdir {runs}/toys_sasrec_seed1")
  assert "Grid pick: sasrec_d0.2" in tuned.row.notes


def test_same_as_counts_an_entry_of_the_same_recipe(tmp_path):
  rows = plan_lib.load_plan(write_plan(tmp_path, GRID.replace(
      'notes = "cell b"', 'notes = "cell b"\nsame_as = "sasrec"')))
  root, runs = str(tmp_path / "results"), str(tmp_path / "runs")
  fake_workdir(rows[1].ledger_dir(root, "sasrec"), rows[1], valid_ndcg=0.06)
  assert states(rows, root, runs)[1] == ("sasrec_d0.5", 0, "done")
  fake_workdir(rows[0].workdir(runs), rows[0], valid_ndcg=0.05)
  assert campaign_status.grid_pick(rows, "toys", "sasrec grid", root, runs).cell.name == "sasrec_d0.5"


# The runner --------------------------------------------------------------------------------


class FakeClock:
  def __init__(self):
    self.seconds = 1000.0

  def __call__(self):
    return self.seconds


class FakeTraining:
  """Stands in for `python bin/train.py`: takes `minutes`, then leaves a finished workdir."""

  def __init__(self, clock, rows, minutes):
    self.clock, self.rows, self.minutes = clock, rows, minutes
    self.started, self.signals = [], []

  evaluation_minutes, evaluation_exit = 3, 0

  def __call__(self, argv, log_path):
    assert argv[1] in ("bin/train.py", "bin/ledger.py") and log_path.endswith(".log")
    self.started.append(argv)
    self.workdir = argv[argv.index("--workdir") + 1]
    self.label = argv[argv.index("--label") + 1] if "--label" in argv else None
    return self

  def wait(self, timeout=None):
    if self.signals:
      return 130
    minutes = self.evaluation_minutes if self.label else self.minutes
    if timeout is not None and minutes * 60 > timeout:
      self.clock.seconds += timeout
      raise subprocess.TimeoutExpired("train", timeout)
    self.clock.seconds += minutes * 60
    if self.label:  # bin/ledger.py evaluate: records the evaluation in the workdir.
      if not self.evaluation_exit:
        ledger.write_evaluation(self.workdir, self.label, "test", {"ndcg@10": 0.04},
                                command="c", settings={})
      return self.evaluation_exit
    (row,) = [r for r in self.rows if self.workdir.endswith(f"{r.dataset}_{r.name}_seed{r.seed}")]
    fake_workdir(self.workdir, row)
    return 0

  def send_signal(self, number):
    self.signals.append(number)

  def kill(self):
    self.signals.append("kill")


def run(tmp_path, plan_text, budget_min, minutes, training=None, **kwargs):
  plan = write_plan(tmp_path, plan_text)
  rows = plan_lib.load_plan(plan)
  clock, lines = FakeClock(), []
  training = training or FakeTraining(clock, rows, minutes)
  clock = training.clock
  code = campaign.run_campaign(plan, root=str(tmp_path / "results"), runs=str(tmp_path / "runs"),
                               report="", budget_min=budget_min, start=training, clock=clock,
                               out=lines.append, **kwargs)
  return code, training, lines, rows


def test_a_row_that_does_not_fit_is_not_started(tmp_path):
  code, training, lines, _ = run(tmp_path, ROW, budget_min=50, minutes=40)
  assert code == 0 and not training.started
  assert "next: toys diffurec seed0 needs ~55 min, 50 min of the budget left: not started" in (
      lines[-1])


def test_a_later_row_that_fits_fills_the_budget(tmp_path):
  short = ROW.replace("seed = 0", "seed = 1").replace("estimate_min = 55", "estimate_min = 20")
  code, training, lines, _ = run(tmp_path, ROW + short, budget_min=50, minutes=15)
  assert code == 0 and len(training.started) == 1
  assert training.workdir.endswith("toys_diffurec_seed1")
  assert any("next in order: toys diffurec seed0 needs ~55 min, 50 min of the budget left; "
             "toys diffurec seed1 (~20 min) fits, so it goes first" in line for line in lines)
  assert "next: toys diffurec seed0 needs ~55 min, 35 min of the budget left" in lines[-1]


def test_a_finished_run_is_added_to_the_ledger_with_its_command(tmp_path):
  two = ROW + ROW.replace("seed = 0", "seed = 1")
  code, training, lines, rows = run(tmp_path, two, budget_min=100, minutes=50)
  assert code == 0 and len(training.started) == 1  # 50 min left: the second (55) does not fit.
  entry = rows[0].ledger_dir(str(tmp_path / "results"))
  record = json.load(open(os.path.join(entry, "run.json")))
  assert record["command"] == plan_lib.command_text(rows[0], str(tmp_path / "runs"))
  assert (record["kind"], record["notes"]) == ("run", "the default recipe")
  assert any("finished toys diffurec seed0 in 50 min" in line for line in lines)
  assert "[+50 min, 50 min left] next: toys diffurec seed1 needs ~55 min" in lines[-1]
  assert campaign_status.classify(rows[0], rows, str(tmp_path / "results"),
                           str(tmp_path / "runs")).state == "done"


def test_finished_workdirs_are_added_first_and_the_report_rebuilt(tmp_path):
  plan = write_plan(tmp_path, ROW)
  (row,) = plan_lib.load_plan(plan)
  root, runs, report = (str(tmp_path / name) for name in ("results", "runs", "results.md"))
  fake_workdir(row.workdir(runs), row)
  lines = []
  campaign.run_campaign(plan, root=root, runs=runs, report=report, budget_min=10,
                        start=None, out=lines.append)
  assert os.path.exists(os.path.join(row.ledger_dir(root), "run.json"))
  assert os.path.exists(report)
  assert any("added the finished" in line for line in lines)


def test_the_budget_running_out_interrupts_the_run(tmp_path):
  code, training, lines, rows = run(tmp_path, ROW, budget_min=60, minutes=80)
  assert code == 0 and training.signals == [signal.SIGINT]
  assert any("budget spent: sending SIGINT to toys diffurec seed0" in line for line in lines)
  assert not os.path.exists(rows[0].ledger_dir(str(tmp_path / "results")))


def test_a_real_run_stops_on_sigint(tmp_path):
  """launch + stop on a real process that exits 130 on SIGINT, as bin/train.py does."""
  log = str(tmp_path / "logs" / "run.log")
  child = ("import sys, time\nprint('ready', flush=True)\n"
           "try:\n  time.sleep(60)\nexcept KeyboardInterrupt:\n  sys.exit(130)\n")
  process = campaign.launch([sys.executable, "-c", child], log)
  for _ in range(500):
    if os.path.getsize(log):
      break
    time.sleep(0.01)
  runner = campaign.Campaign([], root="", runs="", report="", budget_min=1, out=print)
  assert runner.stop(process) == 130


def test_planned_evaluations_are_made_before_the_run_enters_the_ledger(tmp_path):
  code, training, lines, (row,) = run(tmp_path, ROW + EVALUATIONS, budget_min=100, minutes=50)
  assert code == 0
  assert [argv[1:3] for argv in training.started] == [
      ["bin/train.py", "--config"], ["bin/ledger.py", "evaluate"], ["bin/ledger.py", "evaluate"]]
  assert any("evaluate toys diffurec seed0: python bin/ledger.py evaluate --workdir "
             f"{tmp_path}/runs/toys_diffurec_seed0 --label '1 reverse step (test)' --steps=1"
             in line for line in lines)
  evaluations = os.path.join(row.ledger_dir(str(tmp_path / "results")), "evaluations")
  assert sorted(os.listdir(evaluations)) == ["1_reverse_step__test.json", "lambda___0__test.json"]
  assert any("finished toys diffurec seed0 in 50 min" in line for line in lines)


def test_an_interrupted_evaluation_is_made_by_the_next_campaign(tmp_path):
  # 54 min of training and 3 per evaluation in a 56-minute budget: the first evaluation stops.
  code, training, lines, (row,) = run(tmp_path, ROW + EVALUATIONS, budget_min=56, minutes=54)
  assert code == 0 and training.signals == [signal.SIGINT]
  assert any("the evaluation '1 reverse step (test)' of toys diffurec seed0 stopped" in line
             for line in lines)
  root, runs = str(tmp_path / "results"), str(tmp_path / "runs")
  assert campaign_status.classify(row, [row], root, runs).state == "finished"
  again = FakeTraining(FakeClock(), [row], minutes=50)
  code, training, lines, _ = run(tmp_path, ROW + EVALUATIONS, budget_min=10, minutes=50,
                                 training=again)
  assert code == 0 and [argv[1] for argv in again.started] == ["bin/ledger.py"] * 2
  assert any("added the finished" in line for line in lines)
  assert campaign_status.classify(row, [row], root, runs).state == "done"


def test_a_failed_evaluation_stops_the_campaign(tmp_path):
  plan = write_plan(tmp_path, ROW + EVALUATIONS)
  rows = plan_lib.load_plan(plan)
  failing = FakeTraining(FakeClock(), rows, minutes=50)
  failing.evaluation_exit = 1
  with pytest.raises(plan_lib.CampaignError, match="'1 reverse step \\(test\\)' of toys "
                     "diffurec seed0 failed \\(exit 1\\)"):
    run(tmp_path, ROW + EVALUATIONS, budget_min=100, minutes=50, training=failing)
  assert not os.path.exists(rows[0].ledger_dir(str(tmp_path / "results")))


def test_dry_run_starts_nothing(tmp_path):
  code, training, lines, _ = run(tmp_path, ROW + ROW.replace("seed = 0", "seed = 1"),
                                 budget_min=120, minutes=1, dry_run=True)
  assert code == 0 and not training.started
  assert [line.split("] ", 2)[-1].split(" (")[0] for line in lines[1:]] == [
      "would run toys diffurec seed0", "would run toys diffurec seed1",
      "no cpu row left to start"]


# The real plan -----------------------------------------------------------------------------


def test_the_real_plan_parses_and_its_finished_rows_are_done(tmp_path):
  rows = plan_lib.load_plan(os.path.join(ROOT, "results", "plan.toml"))
  root = os.path.join(ROOT, "results")
  in_ledger = [row for row in rows if os.path.isdir(row.ledger_dir(root)) or (
      row.same_as and os.path.isdir(row.ledger_dir(root, row.same_as)))]
  assert {(row.dataset, row.name, row.seed) for row in in_ledger} >= {
      ("toys", "diffurec", 0), ("toys", "v1", 0), ("toys", "v2", 0), ("toys", "sasrec", 0)}
  for row in in_ledger:
    assert campaign_status.classify(row, rows, root, str(tmp_path)).state == "done", row.label
  assert all(row.device == "gpu" for row in rows if row.estimate_min > 150)
