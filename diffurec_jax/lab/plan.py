"""The campaign's plan (`results/plan.toml`): the ledger rows to make, parsed and checked.

Each row gives a dataset, ledger name, seed, kind, the `bin/train.py` config and overrides, an
estimate of its minutes on this CPU and notes; optional fields name a tuning grid (`grid`), the
grid whose best cell a row takes (`after`), an entry made earlier under another name
(`same_as`), a device (`gpu`: too slow for the CPU) and later evaluations of its selected
checkpoint (`evaluations`: `bin/ledger.py evaluate` runs made when training ends, before the
run enters the ledger). A row's `expect` holds the config fields its run must have, so a
workdir made with another recipe is a conflict, not a resume.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import shlex
import tomllib

from diffurec_jax import config as config_lib
from diffurec_jax import errors
from diffurec_jax.lab import experiment
from diffurec_jax.lab import ledger

REQUIRED = ("dataset", "name", "seed", "kind", "estimate_min", "notes")
OPTIONAL = ("config", "overrides", "device", "grid", "after", "same_as", "evaluations")
DEVICES = ("cpu", "gpu")
# The flags of `bin/ledger.py evaluate` an evaluation may set (the workdir and label are the
# campaign's): `{label = "1 reverse step (test)", args = ["--steps=1"]}`.
EVALUATE_FLAGS = ("--split", "--steps", "--sampler", "--lambda0")


class CampaignError(errors.UserError):
  """A plan or campaign that cannot be used as asked, in one sentence for people."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """A later evaluation of a row's selected checkpoint: its label in the ledger and the
  `bin/ledger.py evaluate` flags that make it."""
  label: str
  args: tuple[str, ...] = ()


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
  evaluations: tuple[Evaluation, ...] = ()
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
  row = dataclasses.replace(row, evaluations=_evaluations(table.get("evaluations", []), where))
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
           "after": str, "same_as": str, "evaluations": list}
  for field, value in table.items():
    if isinstance(value, bool) or not isinstance(value, types[field]):
      raise CampaignError(f"{where}: field {field!r} = {value!r} has the wrong type.")
  if not all(isinstance(item, str) for item in table.get("overrides", ())):
    raise CampaignError(f"{where}: overrides must be strings like '--config.train.patience=20'.")


def _evaluations(tables: list, where: str) -> tuple[Evaluation, ...]:
  """The `evaluations` field: tables {label, args}, labels distinct, args among
  EVALUATE_FLAGS."""
  evaluations = []
  for table in tables:
    if (not isinstance(table, dict) or set(table) - {"label", "args"}
        or not isinstance(table.get("label"), str) or not table["label"].strip()
        or not isinstance(table.get("args", []), list)
        or not all(isinstance(arg, str) for arg in table.get("args", []))):
      raise CampaignError(f"{where}: each evaluation is {{label = \"...\", args = [\"--steps=1\"]}}"
                          f", got {table!r}.")
    for arg in table.get("args", []):
      if arg.partition("=")[0] not in EVALUATE_FLAGS:
        raise CampaignError(f"{where}: evaluation {table['label']!r}: {arg!r} is not one of "
                            f"{', '.join(EVALUATE_FLAGS)} (as --flag=value).")
    evaluations.append(Evaluation(table["label"], tuple(table.get("args", []))))
  labels = [evaluation.label for evaluation in evaluations]
  if len(set(labels)) != len(labels):
    raise CampaignError(f"{where}: two evaluations share a label; labels name ledger files.")
  return tuple(evaluations)


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


def evaluation_command(row: Row, evaluation: Evaluation, runs: str,
                       python: str = "python") -> list[str]:
  """The bin/ledger.py evaluate command of one of a row's evaluations (into its workdir)."""
  return [python, "bin/ledger.py", "evaluate", "--workdir", row.workdir(runs), "--label",
          evaluation.label, *evaluation.args]


def evaluation_done(row: Row, evaluation: Evaluation, runs: str) -> bool:
  """Whether the row's workdir already holds this evaluation's record."""
  return os.path.exists(ledger.evaluation_path(row.workdir(runs), evaluation.label))
