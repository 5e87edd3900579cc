"""The accuracy-vs-steps curve (bench/steps.py) on one tiny trained workdir.

One `train_and_evaluate` run on a slice of Toys (module fixture), one `steps_curve` with
K in (1, 2, 32), reverse and DDIM, 2 seeds, shared by every test; K = 32 = T must reproduce
`evaluate_split` exactly, and DDIM with eta = 0 must reproduce itself. A model this small
scores near 0, so the exactness checks compare every user's rank, not only the metrics.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# Its session-wide persistent compilation cache lets the reruns below (evaluate_split at
# K = 32, DDIM again, the user subset) reuse the curve's compiled steps.
import helpers_train

from diffurec_jax.training import checkpoints as checkpoint
from diffurec_jax import data as data_lib
from diffurec_jax import evaluate
from diffurec_jax import serve as infer
from diffurec_jax import sharding
from diffurec_jax.lab import steps_curve as steps_curve_lib
from diffurec_jax.training import loop as train

REPO = pathlib.Path(__file__).resolve().parents[1]
KS = (1, 2, 32)
SEEDS = 2
TINY = {
    "data.max_users": 100,
    "data.max_len": 10,
    "data.download": False,
    "model.hidden": 16,
    "model.num_blocks": 1,
    "model.num_heads": 1,
    "train.num_epochs": 1,
    "train.max_steps_per_epoch": 2,
    "train.batch_size": 32,
    "train.eval_batch_size": 64,
    "sample.steps": 4,
    # One padded length (max_len) instead of two: every evaluation step compiles once.
    "train.length_buckets": (),
}


def _data_root() -> pathlib.Path:
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  root = pathlib.Path(os.environ.get("DIFFUREC_DATA") or default).resolve()
  if not (root / "toys").is_dir():
    pytest.skip(f"No Toys data under {root}; set DIFFUREC_DATA.")
  return root


def _toys_config(preset: str):
  spec = importlib.util.spec_from_file_location("toys_config", REPO / "configs" / "toys.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  config = _toys_config("smoke")
  for name, value in TINY.items():
    section, field = name.split(".")
    setattr(config[section], field, value)
  config.data.root = str(_data_root())
  config.data.cache_dir = str(tmp_path_factory.mktemp("prepared"))
  path = tmp_path_factory.mktemp("steps") / "run"
  train.train_and_evaluate(config, str(path), progress=False)
  return path


@pytest.fixture(scope="module")
def curve(workdir) -> dict:
  return steps_curve_lib.steps_curve(str(workdir), ks=KS, samplers=("reverse", "ddim"),
                                     seeds=SEEDS, progress=False, keep_ranks=True)


def _row(curve, sampler, steps):
  (row,) = [r for r in curve["rows"] if r["sampler"] == sampler and r["K"] == steps]
  return row


def test_rows(curve):
  assert [(r["sampler"], r["K"]) for r in curve["rows"]] == (
      [("reverse", k) for k in KS] + [("ddim", k) for k in KS] + [("one_step", None)])
  assert curve["n_users"] == curve["total_users"] and not curve["subsampled"]
  for row in curve["rows"]:
    assert {"ndcg@10_mean", "ndcg@10_std", "hit@10_mean", "hit@10_std", "users_per_s",
            "n_users", "mask_history", "compile_s"} <= set(row)
    assert row["n_users"] == curve["n_users"] and row["mask_history"] is False
    assert row["calls"] == (row["K"] or 1)
    assert len(row["per_seed"]) == SEEDS
    assert row["users_per_s"] > 0 and row["compile_s"] > 0
    for name in ("ndcg@10", "hit@10"):
      values = [result[name] for result in row["per_seed"]]
      assert row[f"{name}_mean"] == pytest.approx(np.mean(values))
      assert row[f"{name}_std"] == pytest.approx(np.std(values, ddof=1))
      assert 0.0 <= row[f"{name}_mean"] <= 1.0
    assert row["mean"]["mrr@10"] == pytest.approx(
        np.mean([result["mrr@10"] for result in row["per_seed"]]))


def _without_seconds(result: dict) -> dict:
  return {name: value for name, value in result.items() if name != "seconds"}


def test_summarize_mean_and_std_over_seeds():
  per_seed = [{"ndcg@10": v, "hit@10": 2 * v, "mrr@10": v / 2, "users": 7, "seconds": 1.0}
              for v in (0.1, 0.2, 0.3)]
  row = steps_curve_lib.summarize("ddim", 4, per_seed, [30.0, 10.0, 20.0], 2.5,
                                  mask_history=True, eta=0.0)
  assert row["ndcg@10_mean"] == pytest.approx(0.2) and row["ndcg@10_std"] == pytest.approx(0.1)
  assert row["hit@10_mean"] == pytest.approx(0.4) and row["hit@10_std"] == pytest.approx(0.2)
  assert row["mean"] == pytest.approx({"ndcg@10": 0.2, "hit@10": 0.4, "mrr@10": 0.1})
  assert row["users_per_s"] == 20.0 and row["n_users"] == 7 and row["calls"] == 4
  single = steps_curve_lib.summarize("one_step", None, per_seed[:1], [5.0], 1.0,
                                     mask_history=False, eta=None)
  assert single["ndcg@10_std"] is None and single["calls"] == 1


def test_full_chain_reproduces_evaluate_split(curve, workdir):
  loaded = infer.load(str(workdir), steps=32, seeds=1)
  assert loaded.config.sample.sampler == "reverse" and loaded.config.sample.seed == 0
  dataset = data_lib.prepare(loaded.config.data)
  expected, per_user = evaluate.evaluate_split(loaded.bundle, dataset, "test", loaded.config,
                                               sharding.make_mesh(), progress=False)
  row = _row(curve, "reverse", 32)
  assert _without_seconds(row["per_seed"][0]) == _without_seconds(expected)
  np.testing.assert_array_equal(curve["users"], per_user["users"])
  np.testing.assert_array_equal(row["ranks"][0], per_user["ranks"])


def test_ddim_eta0_reproduces(curve, workdir):
  again = steps_curve_lib.steps_curve(str(workdir), ks=(2,), samplers=("ddim",), seeds=1,
                                      progress=False, one_step=False, keep_ranks=True)
  (row,) = again["rows"]
  first = _row(curve, "ddim", 2)
  assert row["eta"] == 0.0
  assert _without_seconds(row["per_seed"][0]) == _without_seconds(first["per_seed"][0])
  np.testing.assert_array_equal(row["ranks"][0], first["ranks"][0])


def test_subset_and_skipped_steps(workdir, curve):
  result = steps_curve_lib.steps_curve(str(workdir), ks=(1, 64), samplers=("ddim",), seeds=1,
                                       max_users=30, progress=False, one_step=False,
                                       keep_ranks=True)
  assert result["subsampled"] and result["n_users"] == 30 and result["total_users"] > 30
  assert [(r["sampler"], r["K"]) for r in result["rows"]] == [("ddim", 1)]
  (row,) = result["rows"]
  assert row["n_users"] == 30 and row["ndcg@10_std"] is None
  assert "64" in result["notes"][0]
  # The chain noise is keyed per user: a subset ranks its users as the full run does.
  users = result["users"]
  assert len(np.unique(users)) == 30 and np.all(np.diff(users) > 0)
  np.testing.assert_array_equal(row["ranks"][0], _row(curve, "ddim", 1)["ranks"][0][users])


@pytest.mark.parametrize("changes, words", [
    ({"ks": (0, 2)}, "integers >= 1"),
    ({"samplers": ("reverse", "ancestral")}, "ancestral"),
    ({"seeds": 0}, "--seeds"),
])
def test_bad_arguments(tmp_path, changes, words):
  arguments = {"ks": (1,), "samplers": ("reverse",), "seeds": 1, "progress": False, **changes}
  with pytest.raises(ValueError, match=words):
    steps_curve_lib.steps_curve(str(tmp_path), **arguments)


def test_no_checkpoint(workdir, tmp_path):
  for name in ("config.json", "id_map.npz"):
    (tmp_path / name).write_bytes((workdir / name).read_bytes())
  with pytest.raises(checkpoint.CheckpointError, match="no validated checkpoint"):
    steps_curve_lib.steps_curve(str(tmp_path), ks=(1,), progress=False)
  # The entrypoint turns it into one `error:` line and exit status 2.
  result = subprocess.run([sys.executable, str(REPO / "bench" / "steps.py"), "--workdir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **helpers_train.COMPILATION_CACHE_ENV))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in (
      result.stderr)


def test_report_files(curve, tmp_path):
  command = "python bench/steps.py --workdir W --ks 1,2,32 --seeds 2"
  paths = steps_curve_lib.write_report(curve, str(tmp_path / "steps"), command)
  saved = json.loads(pathlib.Path(paths["json"]).read_text())
  assert saved["command"] == command and "users" not in saved
  assert saved["rows"] == [{k: v for k, v in row.items() if k != "ranks"}
                           for row in curve["rows"]]
  text = pathlib.Path(paths["md"]).read_text()
  assert command in text and f"all {curve['n_users']} users" in text
  assert "masked from the ranking: no" in text and curve["machine"]["devices"] in text
  assert text.count("\n| reverse |") == len(KS) and "| one_step | – | 1 |" in text
  png = pathlib.Path(paths["png"]).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
