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
the budget lasts, adds each finished run to the ledger and rebuilds docs/results.md.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import tomllib

from diffurec_jax import config as config_lib
from diffurec_jax import errors
from diffurec_jax.lab import experiment
from diffurec_jax.lab import ledger
from diffurec_jax.training import workdir as workdir_lib

REQUIRED = ("dataset", "name", "seed", "kind", "estimate_min", "notes")
OPTIONAL = ("config", "overrides", "device", "grid", "after", "same_as")
DEVICES = ("cpu", "gpu")
# The states of a row, in the order the totals line lists them.
STATES = ("done", "running", "partial", "finished", "waiting", "conflict", "missing", "gpu",
          "cpu")
LEGEND = ("done: in the ledger | running: its workdir is locked by a live process | partial: "
          "checkpoints, no results.json (the runner resumes it) | finished: results.json, not "
          "in the ledger (the runner adds it) | waiting: needs its tuning grid | conflict: made "
          "with another recipe (a person decides) | missing: not started | gpu: runs only with "
          "--device gpu")
# Fields a resumed run may change (train.num_epochs extends a run): never a recipe conflict.
# Fields that do not make another recipe: where the data is, evaluation batching, memory
# splitting, and the schedule's length (a run may be extended by a resume). Optimizer fields
# are resumable too (a diverged run resumes with a lower lr) but are part of the recipe.
_RESUMABLE = ("data.root", "data.cache_dir", "data.download", "train.eval_batch_size",
              "train.num_epochs", "train.microbatch_tokens")
# Seconds a run may take to save and exit after SIGINT before it is signalled again.
_GRACE_S = 600


class CampaignError(errors.UserError):
  """A plan or campaign that cannot be used as asked, in one sentence for people."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One ledger row of the plan.

  `expect` holds (field, value) pairs a run of this recipe has in its config.json: every field
  its dataset config and presets set away from the package defaults, and every override, typed
  as the config types them.
  """
  dataset: str
  name: str
  seed: int
  kind: str
  estimate_min: float
  notes: str
  config: str = ""
  overrides: tuple[str, ...] = ()
  device: str = "cpu"
  grid: str = ""
  after: str = ""
  same_as: str = ""
  expect: tuple = ()

  @property
  def label(self) -> str:
    return f"{self.dataset} {self.name} seed{self.seed}"

  def workdir(self, runs: str) -> str:
    return os.path.join(runs, f"{self.dataset}_{self.name}_seed{self.seed}")

  def ledger_dir(self, root: str, name: str | None = None) -> str:
    return ledger.run_dir(root, self.dataset, name or self.name, self.seed)


# The plan ----------------------------------------------------------------------------------


def load_plan(path: str) -> list[Row]:
  """The rows of a plan file, checked: fields, types, configs, overrides, duplicates, grids."""
  try:
    with open(path, "rb") as f:
      payload = tomllib.load(f)
  except FileNotFoundError as error:
    raise CampaignError(f"No plan file {path}; give --plan, e.g. results/plan.toml.") from error
  except tomllib.TOMLDecodeError as error:
    raise CampaignError(f"{path} is not valid TOML ({error}); fix the file.") from error
  extra = sorted(set(payload) - {"row"})
  if extra or not isinstance(payload.get("row"), list) or not payload["row"]:
    raise CampaignError(f"{path} must hold [[row]] tables and nothing else"
                        f"{f' (found {extra})' if extra else ''}.")
  if not all(isinstance(table, dict) for table in payload["row"]):
    raise CampaignError(f"{path}: every row must be a [[row]] table.")
  rows = [_parse_row(table, f"{path} row {index}") for index, table in
          enumerate(payload["row"], start=1)]
  _check_plan(rows, path)
  return rows


def _parse_row(table: dict, where: str) -> Row:
  """One [[row]] table as a Row; `where` names it in errors (`results/plan.toml row 3`)."""
  unknown = sorted(set(table) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    raise CampaignError(f"{where}: unknown field {unknown[0]!r}; the fields are "
                        f"{', '.join(REQUIRED + OPTIONAL)}.")
  missing = [field for field in REQUIRED if field not in table]
  if missing:
    raise CampaignError(f"{where}: missing field {missing[0]!r}.")
  _check_types(table, where)
  row = Row(dataset=table["dataset"], name=table["name"], seed=table["seed"],
            kind=table["kind"], estimate_min=float(table["estimate_min"]),
            notes=table["notes"], config=table.get("config", ""),
            overrides=tuple(table.get("overrides", ())), device=table.get("device", "cpu"),
            grid=table.get("grid", ""), after=table.get("after", ""),
            same_as=table.get("same_as", ""))
  where = f"{where} ({row.label})"
  if row.kind not in ledger.KINDS:
    raise CampaignError(f"{where}: kind {row.kind!r}; use one of {ledger.KINDS}.")
  if row.device not in DEVICES:
    raise CampaignError(f"{where}: device {row.device!r}; use one of {DEVICES}.")
  if row.seed < 0 or row.estimate_min <= 0 or not row.name or "/" in row.name:
    raise CampaignError(f"{where}: needs seed >= 0, estimate_min > 0 and a name without '/'.")
  if row.after:
    if row.config or row.overrides or row.grid:
      raise CampaignError(f"{where}: a row with `after` takes its config and overrides from "
                          "the grid's best cell; remove config, overrides and grid.")
    return row
  if not row.config:
    raise CampaignError(f"{where}: missing field 'config' (e.g. 'configs/toys.py:diffurec').")
  return dataclasses.replace(row, expect=_expectations(row, where))


def _check_types(table: dict, where: str):
  types = {"dataset": str, "name": str, "seed": int, "kind": str, "estimate_min": (int, float),
           "notes": str, "config": str, "overrides": list, "device": str, "grid": str,
           "after": str, "same_as": str}
  for field, value in table.items():
    if isinstance(value, bool) or not isinstance(value, types[field]):
      raise CampaignError(f"{where}: field {field!r} = {value!r} has the wrong type.")
  if not all(isinstance(item, str) for item in table.get("overrides", ())):
    raise CampaignError(f"{where}: overrides must be strings like '--config.train.patience=20'.")


@functools.lru_cache(maxsize=None)
def _dataset_config(config_arg: str):
  """The flat default config of `configs/<dataset>.py[:presets]` (cached: rows share them)."""
  path, presets = experiment.split_config_arg(config_arg)
  config = experiment.load_config_module(path).get_config(presets or None)
  return experiment.flatten(config)


def _expectations(row: Row, where: str) -> tuple:
  """(field, typed value) of the variant and every override; checks the config argument."""
  try:
    flat = _dataset_config(row.config)
  except errors.UserError as error:
    raise CampaignError(f"{where}: {error}") from error
  if flat["data.name"] != row.dataset:
    raise CampaignError(f"{where}: {row.config} is the {flat['data.name']!r} config, not "
                        f"{row.dataset!r}; use configs/{row.dataset}.py.")
  expect = {"variant": flat["variant"], **dict(_preset_fields(flat))}
  for override in row.overrides:
    field, value = _parse_override(override, flat, where)
    expect[field] = value
  return tuple(expect.items())


def _preset_fields(flat: dict) -> list[tuple]:
  """(field, value) where a dataset config and its presets differ from the package defaults."""
  defaults = experiment.flatten(config_lib.base_config())
  return [(field, list(value) if isinstance(value, tuple) else value)
          for field, value in flat.items()
          if field != "data.name" and value != defaults.get(field)]


def _parse_override(override: str, flat: dict, where: str):
  """'--config.train.patience=20' -> ('train.patience', 20), typed like the default."""
  head, sep, text = override.partition("=")
  field = head[len("--config."):]
  if not head.startswith("--config.") or not sep:
    raise CampaignError(f"{where}: override {override!r} is not --config.<field>=<value>.")
  if field == "seed":
    raise CampaignError(f"{where}: set the seed with the row's `seed` field, not {override!r}.")
  if field not in flat:
    raise CampaignError(f"{where}: override {override!r} names no config field.")
  try:
    return field, _typed(text, flat[field])
  except (ValueError, SyntaxError) as error:
    raise CampaignError(f"{where}: override {override!r}: {text!r} is not a "
                        f"{type(flat[field]).__name__}.") from error


def _typed(text: str, default):
  """`text` as the type of `default` (as config flags read it); tuples become lists."""
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(text)
    return text.lower() in ("true", "1")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  if isinstance(default, (tuple, list)):
    return list(ast.literal_eval(text))
  return text


def _check_plan(rows: list[Row], path: str):
  """No duplicate rows; every `after` names a grid of its dataset; `same_as` is not self."""
  seen = set()
  for row in rows:
    key = (row.dataset, row.name, row.seed)
    if key in seen:
      raise CampaignError(f"{path}: duplicate row {row.label}; keep one.")
    seen.add(key)
    if row.after and not grid_cells(rows, row.dataset, row.after):
      raise CampaignError(f"{path}: {row.label} is after {row.after!r}, but no {row.dataset} "
                          f"row has grid = {row.after!r}.")
    if row.same_as == row.name:
      raise CampaignError(f"{path}: {row.label} is the same_as itself; remove same_as.")


def grid_cells(rows: list[Row], dataset: str, grid: str) -> list[Row]:
  return [row for row in rows if row.dataset == dataset and row.grid == grid]


# Commands ----------------------------------------------------------------------------------


def command(row: Row, runs: str, python: str = "python") -> list[str]:
  """The bin/train.py command of a row: config, seed (when not 0), overrides, workdir."""
  if row.after:
    raise CampaignError(f"{row.label} waits for its grid; it has no command yet.")
  seed = [f"--config.seed={row.seed}"] if row.seed else []
  return [python, "bin/train.py", "--config", row.config, *seed, *row.overrides,
          "--workdir", row.workdir(runs)]


def command_text(row: Row, runs: str) -> str:
  return shlex.join(command(row, runs))


# Where a row stands ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridPick:
  """The best finished cell of a grid (None until every cell is finished)."""
  cell: Row | None
  ndcg: float
  finished: int
  total: int


@dataclasses.dataclass(frozen=True)
class Status:
  """Where a row stands: its state, a short detail, and its minutes left on its device."""
  row: Row
  state: str
  detail: str
  remaining_min: float


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _row_results(row: Row, root: str, runs: str) -> dict | None:
  """results.json of a row: its ledger entry, the same_as entry, else its workdir."""
  for folder in (row.ledger_dir(root), row.same_as and row.ledger_dir(root, row.same_as),
                 row.workdir(runs)):
    results = folder and _read_json(os.path.join(folder, "results.json"))
    if results:
      return results
  return None


def grid_pick(rows: list[Row], dataset: str, grid: str, root: str, runs: str) -> GridPick:
  """The cell with the best validation NDCG@10, once every cell of the grid is finished."""
  cells = grid_cells(rows, dataset, grid)
  scored = [(cell, _row_results(cell, root, runs)) for cell in cells]
  finished = [(cell, results["valid"]["ndcg@10"]) for cell, results in scored if results]
  if len(finished) < len(cells):
    return GridPick(None, math.nan, len(finished), len(cells))
  cell, ndcg = max(finished, key=lambda pair: pair[1])  # The first of equals, in plan order.
  return GridPick(cell, ndcg, len(finished), len(cells))


def resolve(row: Row, pick: GridPick) -> Row:
  """An `after` row with the recipe of its grid's best cell."""
  notes = (f"{row.notes} Grid pick: {pick.cell.name} (best validation NDCG@10 of "
           f"{row.after}, {pick.ndcg:.4f}).").strip()
  return dataclasses.replace(row, config=pick.cell.config, overrides=pick.cell.overrides,
                             expect=pick.cell.expect, after="", notes=notes)


def recipe_differences(row: Row, folder: str) -> list[str]:
  """How the config.json in `folder` differs from the row's recipe ([] when it matches)."""
  if not os.path.exists(os.path.join(folder, "config.json")):
    return []
  flat = workdir_lib.flatten(workdir_lib.config_dict(workdir_lib.load_config(folder)))
  expect = dict(row.expect, **{"data.name": row.dataset, "seed": row.seed})
  return [f"{field} {flat.get(field)!r}, the plan says {value!r}"
          for field, value in expect.items()
          if field not in _RESUMABLE and not _same(flat.get(field), value)]


def _same(actual, expected) -> bool:
  if isinstance(expected, float) and isinstance(actual, (int, float)):
    return math.isclose(actual, expected, rel_tol=1e-9)
  return actual == expected


def lock_owner(workdir: str) -> int | None:
  """The pid training in `workdir` (workdir.Lock: an flock on .lock, which holds the pid)."""
  path = os.path.join(workdir, ".lock")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read().strip()
  pid = int(text) if text.isdigit() else None
  holder = _flock_holder(path)
  if holder is None:  # No /proc/locks (not Linux): a live recorded pid is the owner.
    return pid if pid and _alive(pid) else None
  return holder or None


def _flock_holder(path: str) -> int | None:
  """The pid holding an flock on `path` per /proc/locks; 0 when none; None when unknown."""
  try:
    with open("/proc/locks") as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  stat = os.stat(path)
  inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
  for line in lines:
    parts = [part for part in line.split() if part != "->"]
    if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == inode:
      return int(parts[4])
  return 0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _progress(row: Row, workdir: str) -> tuple[str, float]:
  """('epoch 4/20, 7 min trained', minutes left by the estimate) of a started workdir."""
  log = workdir_lib.MetricsLog(workdir, enabled=False).read()
  epochs = [r["epoch"] for r in log if r.get("split") == "train" and "epoch" in r]
  trained_min = max((r.get("wall_s", 0.0) for r in log), default=0.0) / 60
  config = _read_json(os.path.join(workdir, "config.json")) or {}
  num_epochs = config.get("train", {}).get("num_epochs", "?")
  detail = f"epoch {max(epochs, default=0)}/{num_epochs}, {trained_min:.0f} min trained"
  return detail, max(row.estimate_min - trained_min, 0.1 * row.estimate_min)


def classify(row: Row, rows: list[Row], root: str, runs: str, device: str = "cpu") -> Status:
  """Where `row` stands (one of STATES), for a runner on `device`."""
  pick = None
  if row.after:
    pick = grid_pick(rows, row.dataset, row.after, root, runs)
    if pick.cell is None:
      if os.path.isdir(row.ledger_dir(root)):
        return Status(row, "done", f"{row.ledger_dir(root)} (recipe checked once "
                      f"{row.after} is finished)", 0.0)
      return Status(row, "waiting", f"needs {row.after}: {pick.finished}/{pick.total} cells "
                    "finished", row.estimate_min)
    row = resolve(row, pick)
  chosen = f"; {pick.cell.name} won" if pick else ""
  for name in (row.name, row.same_as):
    folder = name and row.ledger_dir(root, name)
    if folder and os.path.isdir(folder):
      differ = recipe_differences(row, folder)
      if differ:
        return Status(row, "conflict", f"{folder} was made with {differ[0]}; move it aside to "
                      "rerun this row", row.estimate_min)
      return Status(row, "done", folder + chosen, 0.0)
  workdir = row.workdir(runs)
  owner = lock_owner(workdir)
  if owner:
    detail, remaining = _progress(row, workdir)
    return Status(row, "running", f"pid {owner}, {detail}{chosen}", remaining)
  differ = recipe_differences(row, workdir) if workdir_lib.has_checkpoint(workdir) else []
  if differ:
    return Status(row, "conflict", f"{workdir} holds a run with {differ[0]}; move it aside "
                  "to rerun this row", row.estimate_min)
  if os.path.exists(os.path.join(workdir, "results.json")):
    return Status(row, "finished", f"{workdir}: not in the ledger yet", 0.0)
  if row.device != device:
    return Status(row, row.device, f"needs --device {row.device}", row.estimate_min)
  if workdir_lib.has_checkpoint(workdir):
    detail, remaining = _progress(row, workdir)
    return Status(row, "partial", f"{detail}; resumes{chosen}", remaining)
  return Status(row, "missing", chosen.lstrip("; "), row.estimate_min)


def statuses(rows: list[Row], root: str, runs: str, device: str = "cpu") -> list[Status]:
  return [classify(row, rows, root, runs, device) for row in rows]


def status_table(all_status: list[Status], runs: str, device: str = "cpu") -> str:
  """The --status table: one line per row, the totals, and the hours left."""
  header = ("dataset", "name", "seed", "kind", "state", "est.min", "left.min", "detail")
  lines = [[s.row.dataset, s.row.name, str(s.row.seed), s.row.kind, s.state,
            f"{s.row.estimate_min:.0f}", f"{s.remaining_min:.0f}", s.detail]
           for s in all_status]
  widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header) - 1)]
  text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]
          for line in [header, *lines]]
  counts = {state: sum(s.state == state for s in all_status) for state in STATES}
  text.append("totals: " + ", ".join(f"{count} {state}" for state, count in counts.items()
                                     if count) + f" ({len(all_status)} rows)")
  pending = ("running", "partial", "waiting", "missing", "conflict")
  left = sum(s.remaining_min for s in all_status if s.state in pending)
  text.append(f"{device.upper()} time left: ~{left / 60:.1f} h (running, partial, waiting, "
              "missing and conflict rows at their estimates)")
  elsewhere = [s for s in all_status if s.state in DEVICES]
  if elsewhere:
    text.append(f"{len(elsewhere)} rows need another device (~"
                f"{sum(s.remaining_min for s in elsewhere) / 60:.1f} h at this CPU's estimates); "
                f"there: python bin/campaign.py --device {elsewhere[0].state} --budget_min "
                "MINUTES, or one by one:")
    text += ["  " + command_text(s.row, runs) for s in elsewhere]
  text += textwrap.wrap(LEGEND, width=100)
  return "\n".join(text)


# The runner --------------------------------------------------------------------------------


def launch(argv: list[str], log_path: str):
  """Starts a training run in its own session (a Ctrl-C reaches only the campaign)."""
  os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
  with open(log_path, "a") as log:
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def add_to_ledger(row: Row, root: str, runs: str) -> str:
  """Copies a row's finished workdir into the ledger with its command, kind and notes."""
  return ledger.add_run(row.workdir(runs), root, row.name, command=command_text(row, runs),
                        kind=row.kind, notes=row.notes)


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

  def add_finished(self, all_status: list[Status]):
    """Adds the finished workdirs that are not in the ledger yet; rebuilds the report."""
    finished = [s for s in all_status if s.state == "finished"]
    for status in finished:
      if self.dry_run:
        self.say(f"would add {status.row.workdir(self.runs)} to the ledger as "
                 f"{status.row.ledger_dir(self.root)}")
      else:
        target = add_to_ledger(status.row, self.root, self.runs)
        self.say(f"added the finished {status.row.workdir(self.runs)} as {target}")
    if finished and not self.dry_run:
      rebuild_report(self.root, self.report)

  def run(self) -> int:
    """0 when it stops in the budget or runs out of rows, 130 when interrupted."""
    all_status = statuses(self.rows, self.root, self.runs, self.device)
    counts = {state: sum(s.state == state for s in all_status) for state in STATES}
    self.say(f"plan: {len(self.rows)} rows: " + ", ".join(
        f"{count} {state}" for state, count in counts.items() if count))
    for status in all_status:
      if status.state in ("running", "conflict"):
        self.say(f"skipping {status.row.label} ({status.state}: {status.detail})")
    self.add_finished(all_status)
    attempted = set()
    while True:
      candidates = [s for s in statuses(self.rows, self.root, self.runs, self.device)
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
                 f"{command_text(status.row, self.runs)}")
        self.simulated_min += status.remaining_min
        continue
      code = self.run_row(status)
      if code is not None:
        return code

  def run_row(self, status: Status) -> int | None:
    """Trains one row; adds it to the ledger when it finishes (None: go on to the next row).

    Returns the campaign's exit status when it must stop: 0 when the budget ran out during the
    run, 130 when the campaign was interrupted.
    """
    row = status.row
    log_path = os.path.join(self.runs, "logs", f"{row.dataset}_{row.name}_seed{row.seed}.log")
    self.say(f"{'resume' if status.state == 'partial' else 'start'} {row.label} "
             f"(~{status.remaining_min:.0f} min): {command_text(row, self.runs)} "
             f"(log {log_path})")
    started = self.clock()
    process = self.start(command(row, self.runs, sys.executable), log_path)
    code, reason = self.wait(process, row)
    minutes = (self.clock() - started) / 60
    if reason:
      self.say(f"{reason}: {row.label} stopped after {minutes:.0f} min (exit {code}); its "
               "workdir keeps the partial epoch, and the next campaign resumes it")
      return 130 if reason == "interrupted" else 0
    if code != 0:
      raise CampaignError(f"{row.label} failed (exit {code}) after {minutes:.0f} min; see "
                          f"{log_path}, fix the cause and rerun the campaign.")
    target = add_to_ledger(row, self.root, self.runs)
    rebuild_report(self.root, self.report)
    results = _read_json(os.path.join(target, "results.json")) or {}
    test, valid = results.get("test", {}), results.get("valid", {})
    self.say(f"finished {row.label} in {minutes:.0f} min: validation NDCG@10 "
             f"{valid.get('ndcg@10', math.nan):.4f}, test HR@10 {test.get('hit@10', math.nan):.4f}"
             f" NDCG@10 {test.get('ndcg@10', math.nan):.4f}; added as {target}"
             f"{'; ' + self.report + ' rebuilt' if self.report else ''}")
    return None

  def wait(self, process, row: Row) -> tuple[int, str]:
    """(exit status, '' | 'budget spent' | 'interrupted'): SIGINT when the budget runs out."""
    deadline = self.began + self.budget_min * 60
    try:
      with _sigterm_as_interrupt():
        return process.wait(timeout=max(deadline - self.clock(), 0)), ""
    except subprocess.TimeoutExpired:
      self.say(f"budget spent: sending SIGINT to {row.label} (it saves its partial epoch)")
      return self.stop(process), "budget spent"
    except KeyboardInterrupt:
      self.say(f"interrupted: sending SIGINT to {row.label} (it saves its partial epoch)")
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
  does not fit, the first later row that does goes first; stops when none fits. When the budget runs out during a run, the run gets SIGINT (it saves
  its partial epoch; the next campaign resumes it).
  """
  if budget_min <= 0:
    raise errors.UsageError(f"--budget_min={budget_min}; give the minutes the campaign may use.")
  if device not in DEVICES:
    raise errors.UsageError(f"--device={device!r}; use one of {DEVICES}.")
  rows = load_plan(plan)
  return Campaign(rows, root=root, runs=runs, report=report, budget_min=budget_min,
                  device=device, dry_run=dry_run, start=start, clock=clock, out=out).run()


def status_text(plan: str, *, root: str = "results", runs: str = "runs",
                device: str = "cpu") -> str:
  """The --status table of a plan file."""
  if device not in DEVICES:
    raise errors.UsageError(f"--device={device!r}; use one of {DEVICES}.")
  rows = load_plan(plan)
  return status_table(statuses(rows, root, runs, device), runs, device)
