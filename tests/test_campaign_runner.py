"""The campaign's runner (lab/campaign.py): the budget, the ledger, planned evaluations,
interruption; training and evaluation are stood in for by FakeTraining."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffurec_jax.lab import campaign
from diffurec_jax.lab import campaign_status
from diffurec_jax.lab import ledger
from diffurec_jax.lab import plan as plan_lib
from test_campaign import EVALUATIONS, ROW, fake_workdir, in_repository, write_plan  # noqa: F401


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
