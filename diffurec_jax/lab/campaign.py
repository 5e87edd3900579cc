"""The campaign of issue 18: a plan of ledger rows, where each stands, and a runner in a budget.

The plan (`results/plan.toml`) lists every ledger row to make, in the order to make them: its
dataset, ledger name, seed, kind, the `bin/train.py` config and overrides, an estimate of its
minutes on this CPU and notes. A row is *done* when its ledger entry
results/<dataset>/<name>/seed<k>/ exists; otherwise its workdir runs/<dataset>_<name>_seed<k>
says whether it is running (locked by a live process), partial (checkpoints, no results.json:
the same command resumes it) or finished but not yet in the ledger. Rows of a tuning grid
(`grid = "sasrec grid"`) come before the rows that use the grid's best cell (`after = "sasrec
grid"`): those wait until every cell is finished, then take the cell with the best validation
NDCG@10. Rows marked `device = "gpu"` are too slow for the CPU and run only with --device gpu.

`run_campaign` runs the next rows, in plan order, as `python bin/train.py` subprocesses while
the budget lasts, makes each finished run's planned evaluations (`bin/ledger.py evaluate`),
adds the run to the ledger and rebuilds docs/results.md. The plan's
parsing is lab/plan.py; where each row stands, lab/campaign_status.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shlex
import signal
import subprocess
import sys
import time

from diffurec_jax import errors
from diffurec_jax.lab import campaign_status
from diffurec_jax.lab import ledger
from diffurec_jax.lab import plan as plan_lib

# Seconds a run may take to save and exit after SIGINT before it is signalled again.
_GRACE_S = 600


def launch(argv: list[str], log_path: str):
  """Starts a training run in its own session (a Ctrl-C reaches only the campaign)."""
  os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
  with open(log_path, "a") as log:
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def add_to_ledger(row: plan_lib.Row, root: str, runs: str) -> str:
  """Copies a row's finished workdir into the ledger with its command, kind and notes."""
  return ledger.add_run(row.workdir(runs), root, row.name,
                        command=plan_lib.command_text(row, runs), kind=row.kind, notes=row.notes)


def rebuild_report(root: str, report: str):
  if report:
    from diffurec_jax.lab import ledger_report  # matplotlib: only when a report is written.
    ledger_report.write(root, report)


@contextlib.contextmanager
def _sigterm_as_interrupt():
  """SIGTERM to the campaign stops its run like Ctrl-C (main thread only)."""
  def handle(number, frame):
    del number, frame
    raise KeyboardInterrupt
  try:
    previous = signal.signal(signal.SIGTERM, handle)
  except ValueError:  # Not the main thread.
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


class Campaign:
  """Runs the next rows of a plan within `budget_min` minutes (see `run_campaign`)."""

  def __init__(self, rows, *, root, runs, report, budget_min, device="cpu", dry_run=False,
               start=launch, clock=time.monotonic, out=None):
    self.rows, self.root, self.runs, self.report = rows, root, runs, report
    self.budget_min, self.device, self.dry_run = budget_min, device, dry_run
    self.start, self.clock = start, clock
    self.out = out or functools.partial(print, flush=True)
    self.began = clock()
    self.simulated_min = 0.0  # --dry_run: the minutes the rows it would run take.

  def elapsed_min(self) -> float:
    return (self.clock() - self.began) / 60 + self.simulated_min

  def say(self, text: str):
    prefix = "[dry run] " if self.dry_run else ""
    self.out(f"{prefix}[+{self.elapsed_min():.0f} min, "
             f"{self.budget_min - self.elapsed_min():.0f} min left] {text}")

  def log_path(self, row: plan_lib.Row) -> str:
    return os.path.join(self.runs, "logs", f"{row.dataset}_{row.name}_seed{row.seed}.log")

  def add_finished(self, all_status: list[campaign_status.Status]) -> int | None:
    """Adds the finished workdirs that are not in the ledger yet, each after its planned
    evaluations; rebuilds the report. None, or the exit status when the campaign must stop
    (as run_row)."""
    added, stop = 0, None
    for status in [s for s in all_status if s.state == "finished"]:
      stop = self.evaluate(status.row)
      if stop is not None:
        break
      if self.dry_run:
        self.say(f"would add {status.row.workdir(self.runs)} to the ledger as "
                 f"{status.row.ledger_dir(self.root)}")
      else:
        target = add_to_ledger(status.row, self.root, self.runs)
        self.say(f"added the finished {status.row.workdir(self.runs)} as {target}")
        added += 1
    if added:
      rebuild_report(self.root, self.report)
    return stop

  def evaluate(self, row: plan_lib.Row) -> int | None:
    """Makes the row's planned evaluations that its workdir lacks, in order (bin/ledger.py
    evaluate into the workdir; ledger.add_run copies them). None when all are made, else the
    campaign's exit status (as run_row): the next campaign makes the rest."""
    for evaluation in row.evaluations:
      if plan_lib.evaluation_done(row, evaluation, self.runs):
        continue
      argv = plan_lib.evaluation_command(row, evaluation, self.runs, sys.executable)
      shown = shlex.join(["python", *argv[1:]])
      if self.dry_run:
        self.say(f"would evaluate {row.label}: {shown}")
        continue
      self.say(f"evaluate {row.label}: {shown}")
      started = self.clock()
      code, reason = self.wait(self.start(argv, self.log_path(row)), row,
                               what=f"the evaluation {evaluation.label!r} of")
      minutes = (self.clock() - started) / 60
      if reason:
        self.say(f"{reason}: the evaluation {evaluation.label!r} of {row.label} stopped after "
                 f"{minutes:.0f} min; the next campaign makes it before adding the run")
        return 130 if reason == "interrupted" else 0
      if code != 0:
        raise plan_lib.CampaignError(
            f"The evaluation {evaluation.label!r} of {row.label} failed (exit {code}); see "
            f"{self.log_path(row)}, fix the cause and rerun the campaign.")
      self.say(f"evaluated {row.label}: {evaluation.label} in {minutes:.0f} min")
    return None

  def run(self) -> int:
    """0 when it stops in the budget or runs out of rows, 130 when interrupted."""
    all_status = campaign_status.statuses(self.rows, self.root, self.runs, self.device)
    counts = {state: sum(s.state == state for s in all_status) for state in campaign_status.STATES}
    self.say(f"plan: {len(self.rows)} rows: " + ", ".join(
        f"{count} {state}" for state, count in counts.items() if count))
    for status in all_status:
      if status.state in ("running", "conflict"):
        self.say(f"skipping {status.row.label} ({status.state}: {status.detail})")
    stop = self.add_finished(all_status)
    if stop is not None:
      return stop
    attempted = set()
    while True:
      candidates = [s for s in campaign_status.statuses(self.rows, self.root, self.runs,
                                                        self.device)
                    if s.state in ("missing", "partial") and s.row.label not in attempted]
      if not candidates:
        self.say(f"no {self.device} row left to start (see --status for the others)")
        return 0
      left = self.budget_min - self.elapsed_min()
      fitting = [s for s in candidates if s.remaining_min <= left]
      if not fitting:
        status = candidates[0]
        self.say(f"next: {status.row.label} needs ~{status.remaining_min:.0f} min, "
                 f"{max(left, 0):.0f} min of the budget left: not started; stopping")
        return 0
      status = fitting[0]
      if status is not candidates[0]:  # Fill the budget with a later row rather than idle.
        self.say(f"next in order: {candidates[0].row.label} needs "
                 f"~{candidates[0].remaining_min:.0f} min, {left:.0f} min of the budget left; "
                 f"{status.row.label} (~{status.remaining_min:.0f} min) fits, so it goes first")
      attempted.add(status.row.label)
      if self.dry_run:
        self.say(f"would {'resume' if status.state == 'partial' else 'run'} "
                 f"{status.row.label} (~{status.remaining_min:.0f} min): "
                 f"{plan_lib.command_text(status.row, self.runs)}")
        self.simulated_min += status.remaining_min
        continue
      code = self.run_row(status)
      if code is not None:
        return code

  def run_row(self, status: campaign_status.Status) -> int | None:
    """Trains one row; adds it to the ledger when it finishes (None: go on to the next row).

    Returns the campaign's exit status when it must stop: 0 when the budget ran out during the
    run, 130 when the campaign was interrupted.
    """
    row = status.row
    log_path = self.log_path(row)
    self.say(f"{'resume' if status.state == 'partial' else 'start'} {row.label} "
             f"(~{status.remaining_min:.0f} min): {plan_lib.command_text(row, self.runs)} "
             f"(log {log_path})")
    started = self.clock()
    process = self.start(plan_lib.command(row, self.runs, sys.executable), log_path)
    code, reason = self.wait(process, row)
    minutes = (self.clock() - started) / 60
    if reason:
      self.say(f"{reason}: {row.label} stopped after {minutes:.0f} min (exit {code}); its "
               "workdir keeps the partial epoch, and the next campaign resumes it")
      return 130 if reason == "interrupted" else 0
    if code != 0:
      raise plan_lib.CampaignError(f"{row.label} failed (exit {code}) after {minutes:.0f} min; see "
                          f"{log_path}, fix the cause and rerun the campaign.")
    stop = self.evaluate(row)
    if stop is not None:
      return stop
    target = add_to_ledger(row, self.root, self.runs)
    rebuild_report(self.root, self.report)
    results = campaign_status.read_json(os.path.join(target, "results.json")) or {}
    test, valid = results.get("test", {}), results.get("valid", {})
    self.say(f"finished {row.label} in {minutes:.0f} min: validation NDCG@10 "
             f"{valid.get('ndcg@10', math.nan):.4f}, test HR@10 {test.get('hit@10', math.nan):.4f}"
             f" NDCG@10 {test.get('ndcg@10', math.nan):.4f}; added as {target}"
             f"{'; ' + self.report + ' rebuilt' if self.report else ''}")
    return None

  def wait(self, process, row: plan_lib.Row, what: str = "") -> tuple[int, str]:
    """(exit status, '' | 'budget spent' | 'interrupted'): SIGINT when the budget runs out.
    `what` names an evaluation (training by default: it saves its partial epoch)."""
    deadline = self.began + self.budget_min * 60
    target = f"{what} {row.label}" if what else f"{row.label} (it saves its partial epoch)"
    try:
      with _sigterm_as_interrupt():
        return process.wait(timeout=max(deadline - self.clock(), 0)), ""
    except subprocess.TimeoutExpired:
      self.say(f"budget spent: sending SIGINT to {target}")
      return self.stop(process), "budget spent"
    except KeyboardInterrupt:
      self.say(f"interrupted: sending SIGINT to {target}")
      return self.stop(process), "interrupted"

  def stop(self, process) -> int:
    """SIGINT, then again after a grace period (it stops without saving), then kill."""
    for send in (lambda: process.send_signal(signal.SIGINT),
                 lambda: process.send_signal(signal.SIGINT), process.kill):
      send()
      try:
        return process.wait(timeout=_GRACE_S)
      except subprocess.TimeoutExpired:
        continue
    return process.wait()


def run_campaign(plan: str, *, root: str = "results", runs: str = "runs",
                 report: str = "docs/results.md", budget_min: float, device: str = "cpu",
                 dry_run: bool = False, start=launch, clock=time.monotonic, out=None) -> int:
  """Runs the plan's next rows on `device` within `budget_min` minutes; returns an exit status.

  First adds finished workdirs that are not in the ledger; then, in plan order, starts each
  missing or partial row whose estimate fits in the budget left (a partial one resumes: same
  command), adds it to the ledger when it finishes and rebuilds `report`; when the next row
  does not fit, the first later row that does goes first; stops when none fits. When the
  budget runs out during a run, the run gets SIGINT (it saves its partial epoch; the next
  campaign resumes it).
  """
  if budget_min <= 0:
    raise errors.UsageError(f"--budget_min={budget_min}; give the minutes the campaign may use.")
  if device not in plan_lib.DEVICES:
    raise errors.UsageError(f"--device={device!r}; use one of {plan_lib.DEVICES}.")
  rows = plan_lib.load_plan(plan)
  return Campaign(rows, root=root, runs=runs, report=report, budget_min=budget_min,
                  device=device, dry_run=dry_run, start=start, clock=clock, out=out).run()


def status_text(plan: str, *, root: str = "results", runs: str = "runs",
                device: str = "cpu") -> str:
  """The --status table of a plan file."""
  if device not in plan_lib.DEVICES:
    raise errors.UsageError(f"--device={device!r}; use one of {plan_lib.DEVICES}.")
  rows = plan_lib.load_plan(plan)
  all_status = campaign_status.statuses(rows, root, runs, device)
  return campaign_status.status_table(all_status, runs, device)
