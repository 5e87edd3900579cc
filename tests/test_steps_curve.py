"""The accuracy-vs-steps curve (bench/steps.py) on one tiny trained workdir.

The session's shared tiny run (helpers_train.trained_workdir) and one `steps_curve` with
K in (2, 32), reverse and DDIM, 2 seeds, shared by every test; K = 32 = T must reproduce
`Evaluator.evaluate` exactly, and DDIM with eta = 0 must reproduce itself. A model this small
scores near 0, so the exactness checks compare every user's rank, not only the metrics.
"""

import json
import pathlib

import numpy as np
import pytest

# Its session-wide persistent compilation cache lets the reruns below (the Evaluator at
# K = 32, DDIM again, the user subset) reuse the curve's compiled steps.
import helpers_train
from helpers_train import trained_run, trained_workdir  # noqa: F401  (fixtures)

from diffurec_jax.training import checkpoints as checkpoint
from diffurec_jax import evaluate
from diffurec_jax.lab import steps_curve as steps_curve_lib

KS = (2, 32)
SEEDS = 2


@pytest.fixture(scope="module")
def workdir(trained_workdir) -> pathlib.Path:
  """The session's shared tiny run (helpers_train), read only."""
  return trained_workdir


@pytest.fixture(scope="module")
def curve(workdir) -> dict:
  return steps_curve_lib.steps_curve(str(workdir), ks=KS, samplers=("reverse", "ddim"),
                                     seeds=SEEDS, progress=False, keep_ranks=True)


def _row(curve, sampler, steps):
  (row,) = [r for r in curve["rows"] if r["sampler"] == sampler and r["K"] == steps]
  return row


@pytest.mark.slow
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


@pytest.mark.slow
def test_full_chain_reproduces_the_evaluator(curve, workdir):
  expected, per_user, loaded = evaluate.evaluate_workdir(str(workdir), "test", steps=32,
                                                         seeds=1, progress=False)
  assert loaded.config.sample.sampler == "reverse" and loaded.config.sample.seed == 0
  row = _row(curve, "reverse", 32)
  assert _without_seconds(row["per_seed"][0]) == _without_seconds(expected)
  np.testing.assert_array_equal(curve["users"], per_user["users"])
  np.testing.assert_array_equal(row["ranks"][0], per_user["ranks"])


@pytest.mark.slow
def test_ddim_eta0_reproduces(curve, workdir):
  again = steps_curve_lib.steps_curve(str(workdir), ks=(2,), samplers=("ddim",), seeds=1,
                                      progress=False, one_step=False, keep_ranks=True)
  (row,) = again["rows"]
  first = _row(curve, "ddim", 2)
  assert row["eta"] == 0.0
  assert _without_seconds(row["per_seed"][0]) == _without_seconds(first["per_seed"][0])
  np.testing.assert_array_equal(row["ranks"][0], first["ranks"][0])


@pytest.mark.slow
def test_subset_and_skipped_steps(workdir, curve):
  result = steps_curve_lib.steps_curve(str(workdir), ks=(2, 64), samplers=("ddim",), seeds=1,
                                       max_users=30, progress=False, one_step=False,
                                       keep_ranks=True)
  assert result["subsampled"] and result["n_users"] == 30 and result["total_users"] > 30
  assert [(r["sampler"], r["K"]) for r in result["rows"]] == [("ddim", 2)]
  (row,) = result["rows"]
  assert row["n_users"] == 30 and row["ndcg@10_std"] is None
  assert "64" in result["notes"][0]
  # The chain noise is keyed per user: a subset ranks its users as the full run does.
  users = result["users"]
  assert len(np.unique(users)) == 30 and np.all(np.diff(users) > 0)
  np.testing.assert_array_equal(row["ranks"][0], _row(curve, "ddim", 2)["ranks"][0][users])


@pytest.mark.parametrize("changes, words", [
    ({"ks": (0, 2)}, "integers >= 1"),
    ({"samplers": ("reverse", "ancestral")}, "ancestral"),
    ({"seeds": 0}, "--seeds"),
])
def test_bad_arguments(tmp_path, changes, words):
  arguments = {"ks": (1,), "samplers": ("reverse",), "seeds": 1, "progress": False, **changes}
  with pytest.raises(ValueError, match=words):
    steps_curve_lib.steps_curve(str(tmp_path), **arguments)


@pytest.mark.slow
def test_no_checkpoint(workdir, tmp_path):
  for name in ("config.json", "id_map.npz"):
    (tmp_path / name).write_bytes((workdir / name).read_bytes())
  with pytest.raises(checkpoint.CheckpointError, match="no validated checkpoint"):
    steps_curve_lib.steps_curve(str(tmp_path), ks=(1,), progress=False)
  # The entrypoint turns it into one `error:` line and exit status 2.
  result = helpers_train.run_script("bench/steps.py", "--workdir", str(tmp_path))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in (
      result.stderr)


@pytest.mark.slow
def test_report_files(curve, tmp_path):
  command = "python bench/steps.py --workdir W --ks 1,2,32 --seeds 2"
  paths = steps_curve_lib.write_report(curve, str(tmp_path / "steps"), command)
  saved = json.loads(pathlib.Path(paths["json"]).read_text())
  assert saved["command"] == command and "users" not in saved
  assert saved["rows"] == [{k: v for k, v in row.items() if k != "ranks"}
                           for row in curve["rows"]]
  text = pathlib.Path(paths["md"]).read_text()
  assert command in text and f"all {curve['n_users']} users" in text
  assert "masked from the ranking: no" in text and curve["machine"]["device"] in text
  assert text.count("\n| reverse |") == len(KS) and "| one_step | – | 1 |" in text
  png = pathlib.Path(paths["png"]).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
