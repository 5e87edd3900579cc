"""The campaign of issue 18: the plan, each row's status, the grid pick (its runner:
test_campaign_runner.py)."""

import json
import os

import pytest

from diffurec_jax.lab import campaign_status
from diffurec_jax.lab import plan as plan_lib
from diffurec_jax.lab import experiment
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
