"""Workdir config checks: what a rerun may change, and runs written before a field existed."""

import json
import pathlib

import pytest

from diffurec_jax import config as config_lib
from diffurec_jax import config_check
from diffurec_jax.training import workdir as workdir_lib


def toys_config(presets="diffurec"):
  config = config_lib.base_config()
  config.data.name = "toys"
  return config_lib.apply_presets(config, presets)


def write_config_without(path, config, *fields):
  """config.json as an older version wrote it: without `fields` (dotted names)."""
  payload = workdir_lib.config_dict(config)
  for field in fields:
    section, name = field.split(".")
    del payload[section][name]
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(payload))


@pytest.mark.parametrize("overrides,accepted", [
    ({}, True),
    ({"train.num_epochs": 80, "train.eval_batch_size": 64}, True),  # Resumable changes.
    ({"model.hidden": 64}, False),
    ({"train.eval_every": 2}, False),
])
def test_a_rerun_may_change_only_resumable_fields(tmp_path, overrides, accepted):
  workdir_lib.check_or_write_config(str(tmp_path), toys_config(), write=True)
  (tmp_path / "checkpoints" / "latest" / "1").mkdir(parents=True)  # Something was trained.
  config = toys_config()
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  if accepted:
    workdir_lib.check_or_write_config(str(tmp_path), config, write=False)
  else:
    with pytest.raises(workdir_lib.WorkdirError, match=next(iter(overrides))):
      workdir_lib.check_or_write_config(str(tmp_path), config, write=False)


def test_a_workdir_where_nothing_was_trained_takes_a_new_config(tmp_path, capsys):
  workdir_lib.check_or_write_config(str(tmp_path), toys_config(), write=True)
  mtime = (tmp_path / "config.json").stat().st_mtime_ns
  assert workdir_lib.check_or_write_config(str(tmp_path), toys_config(), write=True) == "same"
  assert (tmp_path / "config.json").stat().st_mtime_ns == mtime  # Not rewritten.
  config = toys_config()
  config.model.hidden = 64
  assert workdir_lib.check_or_write_config(str(tmp_path), config, write=True) == "replaced"
  assert "replaced its config.json (model.hidden: 128 -> 64)" in capsys.readouterr().out
  assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden"] == 64


@pytest.mark.parametrize("presets,accepted", [
    ("diffurec,paper", True),       # The added fields at the values old runs used: the same run.
    ("diffurec", False),  # model.item_init_std 0.02 (the default) is not what the old run used.
])
def test_runs_written_before_a_field_existed_resume_at_its_default(tmp_path, presets, accepted):
  write_config_without(tmp_path, toys_config("diffurec,paper"), "model.item_init_std",
                       "model.score_scale")
  (tmp_path / "results.json").write_text("{}")  # A finished run.
  if accepted:
    workdir_lib.check_or_write_config(str(tmp_path), toys_config(presets), write=False)
  else:
    with pytest.raises(workdir_lib.WorkdirError, match="model.item_init_std"):
      workdir_lib.check_or_write_config(str(tmp_path), toys_config(presets), write=False)


def test_load_config_fills_fields_added_since_the_run(tmp_path):
  write_config_without(tmp_path, toys_config("diffurec"), "model.score_scale")
  config = workdir_lib.load_config(str(tmp_path))
  assert config.model.score_scale == 1.0
  assert config.model.item_init_std == 0.02  # Written fields are kept.


LEDGER = pathlib.Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize("path", sorted(LEDGER.rglob("config.json")),
                         ids=lambda p: str(p.parent.relative_to(LEDGER)))
def test_every_ledger_config_still_loads(path):
  """Each run in results/ reads as a valid config of today's fields (a rerun resumes it)."""
  config = workdir_lib.load_config(str(path.parent))
  config_check.validate(config)
  today = set(workdir_lib.flatten(workdir_lib.config_dict(config_lib.base_config())))
  assert set(workdir_lib.flatten(workdir_lib.config_dict(config))) == today


def test_removed_fields_are_dropped(tmp_path):
  payload = workdir_lib.config_dict(toys_config())
  payload["sample"]["topk"] = 10  # Written by runs before the field was removed.
  (tmp_path / "config.json").write_text(json.dumps(payload))
  assert "topk" not in workdir_lib.load_config(str(tmp_path)).sample
  workdir_lib.check_config(str(tmp_path), toys_config())  # Same run: no difference.
