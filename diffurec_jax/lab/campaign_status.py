"""Where each row of the campaign's plan stands: done, running, partial, finished, waiting,
conflict, missing or gpu, from the ledger (results/) and the row's workdir (runs/), and the
table `bin/campaign.py --status` prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap

from diffurec_jax.lab import plan as plan_lib
from diffurec_jax.training import workdir as workdir_lib

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


# Where a row stands ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridPick:
  """The best finished cell of a grid (None until every cell is finished)."""
  cell: plan_lib.Row | None
  ndcg: float
  finished: int
  total: int


@dataclasses.dataclass(frozen=True)
class Status:
  """Where a row stands: its state, a short detail, and its minutes left on its device."""
  row: plan_lib.Row
  state: str
  detail: str
  remaining_min: float


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _row_results(row: plan_lib.Row, root: str, runs: str) -> dict | None:
  """results.json of a row: its ledger entry, the same_as entry, else its workdir."""
  for folder in (row.ledger_dir(root), row.same_as and row.ledger_dir(root, row.same_as),
                 row.workdir(runs)):
    results = folder and read_json(os.path.join(folder, "results.json"))
    if results:
      return results
  return None


def grid_pick(rows: list[plan_lib.Row], dataset: str, grid: str, root: str, runs: str) -> GridPick:
  """The cell with the best validation NDCG@10, once every cell of the grid is finished."""
  cells = plan_lib.grid_cells(rows, dataset, grid)
  scored = [(cell, _row_results(cell, root, runs)) for cell in cells]
  finished = [(cell, results["valid"]["ndcg@10"]) for cell, results in scored if results]
  if len(finished) < len(cells):
    return GridPick(None, math.nan, len(finished), len(cells))
  cell, ndcg = max(finished, key=lambda pair: pair[1])  # The first of equals, in plan order.
  return GridPick(cell, ndcg, len(finished), len(cells))


def resolve(row: plan_lib.Row, pick: GridPick) -> plan_lib.Row:
  """An `after` row with the recipe of its grid's best cell."""
  notes = (f"{row.notes} Grid pick: {pick.cell.name} (best validation NDCG@10 of "
           f"{row.after}, {pick.ndcg:.4f}).").strip()
  return dataclasses.replace(row, config=pick.cell.config, overrides=pick.cell.overrides,
                             expect=pick.cell.expect, after="", notes=notes)


def recipe_differences(row: plan_lib.Row, folder: str) -> list[str]:
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


def _progress(row: plan_lib.Row, workdir: str) -> tuple[str, float]:
  """('epoch 4/20, 7 min trained', minutes left by the estimate) of a started workdir."""
  log = workdir_lib.MetricsLog(workdir, enabled=False).read()
  epochs = [r["epoch"] for r in log if r.get("split") == "train" and "epoch" in r]
  trained_min = max((r.get("wall_s", 0.0) for r in log), default=0.0) / 60
  config = read_json(os.path.join(workdir, "config.json")) or {}
  num_epochs = config.get("train", {}).get("num_epochs", "?")
  detail = f"epoch {max(epochs, default=0)}/{num_epochs}, {trained_min:.0f} min trained"
  return detail, max(row.estimate_min - trained_min, 0.1 * row.estimate_min)


def classify(row: plan_lib.Row, rows: list[plan_lib.Row], root: str, runs: str,
             device: str = "cpu") -> Status:
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


def statuses(rows: list[plan_lib.Row], root: str, runs: str, device: str = "cpu") -> list[Status]:
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
  elsewhere = [s for s in all_status if s.state in plan_lib.DEVICES]
  if elsewhere:
    text.append(f"{len(elsewhere)} rows need another device (~"
                f"{sum(s.remaining_min for s in elsewhere) / 60:.1f} h at this CPU's estimates); "
                f"there: python bin/campaign.py --device {elsewhere[0].state} --budget_min "
                "MINUTES, or one by one:")
    text += ["  " + plan_lib.command_text(s.row, runs) for s in elsewhere]
  text += textwrap.wrap(LEGEND, width=100)
  return "\n".join(text)


# The runner --------------------------------------------------------------------------------
