"""Seed ensembles (DiffuRecSys Algorithm 3) of a trained run, recorded into the ledger.

The session's shared tiny run (helpers_train.trained_workdir) is added to a tmp ledger and
`bin/ledger.py ensemble --seeds 1,2` runs once on it (shared by the tests below): S = 1 must be
the run's plain test evaluation exactly, S = 2 another, reproducible result. The report
section is checked on a hand-made ensemble.json with hand-picked ranks.
"""

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import helpers_train
from helpers_train import trained_run, trained_workdir  # noqa: F401  (fixtures)

from diffurec_jax import evaluate
from diffurec_jax import metrics as metrics_lib
from diffurec_jax import sharding
from diffurec_jax.lab import ensemble as ensemble_lib
from diffurec_jax.lab import ledger
from diffurec_jax.lab import ledger_report
from diffurec_jax.lab import user_tests

CHAINS = (1, 2)


@pytest.fixture(scope="module")
def entry(trained_workdir, tmp_path_factory) -> str:
  """The tiny run added to a tmp ledger: results/<dataset>/tiny/seed0."""
  root = tmp_path_factory.mktemp("ledger") / "results"
  return ledger.add_run(str(trained_workdir), str(root), "tiny",
                        command="python bin/train.py --config configs/custom.py:smoke")


@pytest.fixture(scope="module")
def recorded(trained_workdir, entry) -> dict:
  """`bin/ledger.py ensemble --seeds 1,2` on the tiny run: its output, JSON and ranks."""
  result = helpers_train.run_script("bin/ledger.py", "ensemble", "--workdir",
                                    str(trained_workdir), "--entry", entry, "--seeds", "1,2")
  assert result.returncode == 0, result.stderr[-3000:]
  payload = helpers_train.read_json(pathlib.Path(entry) / ledger.ENSEMBLE_FILE)
  return {"result": result, "payload": payload, "ranks": ledger.read_ensemble_ranks(entry)}


def _row(payload: dict, chains: int) -> dict:
  (row,) = [r for r in payload["rows"] if r["S"] == chains]
  return row


@pytest.mark.slow
def test_one_chain_is_the_runs_plain_test_evaluation(recorded, trained_workdir):
  expected, per_user, loaded = evaluate.evaluate_workdir(str(trained_workdir), "test",
                                                         progress=False)
  assert loaded.config.sample.seeds == 1
  payload, saved = recorded["payload"], recorded["ranks"]
  single = _row(payload, 1)
  assert single["metrics"] == {k: v for k, v in expected.items() if k not in ("users", "seconds")}
  results = helpers_train.read_json(trained_workdir / "results.json")
  assert results["test"] == {k: single["metrics"][k] for k in metrics_lib.RESULT_KEYS}
  assert payload["n_users"] == payload["total_users"] == expected["users"]
  assert not payload["subsampled"] and payload["best_epoch"] == results["best_epoch"]
  assert payload["steps"] == 32 and payload["sampler"] == "reverse"
  np.testing.assert_array_equal(saved["users"], per_user["users"])
  np.testing.assert_array_equal(saved["chains"], CHAINS)
  np.testing.assert_array_equal(saved["ranks"][0],
                                np.minimum(per_user["ranks"], ledger.RANK_CAP))


@pytest.mark.slow
def test_two_chains_differ_from_one_and_reproduce(recorded, trained_workdir):
  payload, saved = recorded["payload"], recorded["ranks"]
  single, double = _row(payload, 1), _row(payload, 2)
  assert double["metrics"] != single["metrics"]
  assert np.any(saved["ranks"][1] != saved["ranks"][0])
  # The same chains per batch: half the users per batch with two chains each.
  assert (single["batch_users"], double["batch_users"]) == (64, 32)
  again = ensemble_lib.seed_ensembles(str(trained_workdir), (2,), progress=False)
  (row,) = again["rows"]
  assert row["metrics"] == double["metrics"]
  np.testing.assert_array_equal(np.minimum(again["ranks"][0], ledger.RANK_CAP),
                                saved["ranks"][1])


@pytest.mark.slow
def test_recorded_fields_and_capped_ranks_give_every_metric(recorded):
  payload, saved = recorded["payload"], recorded["ranks"]
  assert payload["chains"] == list(CHAINS) and payload["mask_history"] is False
  assert payload["command"].startswith("python bin/ledger.py ensemble --workdir WORKDIR "
                                       "--entry ENTRY --seeds 1,2")
  assert {"cpu", "cores", "jax", "device"} <= set(payload["machine"])
  assert len(payload["load_average"]) == 2 and min(payload["load_average"]) >= 0
  for row, ranks in zip(payload["rows"], saved["ranks"]):
    assert row["users_per_s"] > 0 and row["compile_s"] > 0 and row["seconds"] > 0
    assert set(row["metrics"]) == {f"{m}@{k}" for m in ("hit", "ndcg", "mrr")
                                   for k in metrics_lib.KS}
    sums = metrics_lib.metric_sums(jnp.asarray(ranks), jnp.ones(len(ranks)))
    recomputed = metrics_lib.finalize({k: float(v) for k, v in sums.items()})
    for name, value in row["metrics"].items():
      assert recomputed[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
  assert "S=2: hit@10" in recorded["result"].stdout


@pytest.mark.slow
def test_the_report_shows_the_recorded_ensembles(recorded, entry, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(entry)))
  text = ledger_report.build_markdown(root, str(tmp_path / "figures"), "figures")
  assert "### Seed ensembles (DiffuRecSys Algorithm 3)" in text
  single = _row(recorded["payload"], 1)
  assert (f"| tiny s0 | 1 | {100 * single['metrics']['hit@10']:.2f} | "
          f"{100 * single['metrics']['ndcg@10']:.2f} | - | - |") in text
  assert "| tiny s0 | 2 |" in text and "--workdir WORKDIR --entry ENTRY" in text
  assert "**Verdict on seed ensembles**" in text
  assert root not in text and str(helpers_train.REPO) not in text


# The report section on a hand-made ensemble -------------------------------------------------


def _fake_entry(root, name="v2", chains=(1, 2, 4), ranks=None, ndcg=(0.04, 0.0425, 0.05),
                load=None):
  folder = os.path.join(root, "toys", name, "seed0")
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"seed": 0, "variant": name}, f)
  with open(os.path.join(folder, "run.json"), "w") as f:
    json.dump({"kind": "run"}, f)
  machine = {"cpu": "Test CPU", "cores": 2, "platform": "cpu", "jax": "0"}
  rows = [{"S": s, "metrics": {"hit@10": 2 * value, "ndcg@10": value}, "users_per_s": 100.0 / s,
           "seconds": 1.0, "compile_s": 2.0 * s, "batch_users": 1024 // s}
          for s, value in zip(chains, ndcg)]
  payload = {"command": "python bin/ledger.py ensemble --workdir WORKDIR", "best_epoch": 18,
             "sampler": "reverse", "steps": 32, "n_users": 6, "total_users": 10,
             "subsampled": True, "subset_seed": 0, "mask_history": False,
             "eval_batch_size": 1024, "machine": machine, "rows": rows}
  if load is not None:
    payload["load_average"] = load
  if ranks is None:
    with open(os.path.join(folder, ledger.ENSEMBLE_FILE), "w") as f:
      json.dump(payload, f)
  else:
    ledger.write_ensemble(folder, payload, np.arange(6), list(chains), ranks)
  return folder


RANKS = np.array([[1, 3, 12, 40, 2, 9],     # S = 1
                  [1, 2, 11, 500, 2, 10],   # S = 2
                  [1, 1, 4, 30, 3, 7]])     # S = 4


def test_report_section_from_a_fake_ensemble(tmp_path):
  root = str(tmp_path / "results")
  _fake_entry(root, ranks=RANKS)
  lines = ledger_report.ensemble_section(root, ledger.load(root))
  ndcg = user_tests.per_user_ndcg10(np.minimum(RANKS, ledger.RANK_CAP))
  p2, p4 = (stats.ttest_rel(ndcg[i], ndcg[0]).pvalue for i in (1, 2))
  table = [line for line in lines if line.startswith("| v2 s0 |")]
  assert table == [
      "| v2 s0 | 1 | 8.00 | 4.00 | - | - | - | 100.0 | "
      "`python bin/ledger.py ensemble --workdir WORKDIR` |",
      f"| v2 s0 | 2 | 8.50 | 4.25 | +0.25 | {p2:.2g} | 3 of 6 | 50.0 |  |",  # 40 -> 500: not.
      f"| v2 s0 | 4 | 10.00 | 5.00 | +1.00 | {p4:.2g} | 4 of 6 | 25.0 |  |"]
  assert lines[0] == "### Seed ensembles (DiffuRecSys Algorithm 3)"
  (note,) = [line for line in lines if line.startswith("- **v2 s0**")]
  assert "6 of 10 test users" in note and "by S: 1: 2.0, 2: 4.0, 4: 8.0" in note
  assert "Test CPU, 2 cores" in note


@pytest.mark.parametrize("load, words, shared", [
    (None, None, False),
    ([0.2, 0.4], "load average 0.2 before, 0.4 after", False),
    ([2.1, 1.9], "load average 2.1 before, 1.9 after", True),  # Beside a training run.
])
def test_report_says_when_the_machine_was_shared(tmp_path, load, words, shared):
  root = str(tmp_path / "results")
  _fake_entry(root, load=load)
  (note,) = [line for line in ledger_report.ensemble_section(root, ledger.load(root))
             if line.startswith("- **v2 s0**")]
  assert ("load average" in note) == (load is not None)
  if words:
    assert words in note, note
  assert ("users/s are lower bounds" in note) == shared, note


def test_identical_ranks_have_no_p(tmp_path):
  root = str(tmp_path / "results")
  _fake_entry(root, chains=(1, 2), ranks=RANKS[[0, 0]], ndcg=(0.04, 0.04))
  lines = ledger_report.ensemble_section(root, ledger.load(root))
  assert "| v2 s0 | 2 | 8.00 | 4.00 | +0.00 | n/a (identical) | 0 of 6 | 50.0 |  |" in lines


def test_report_section_without_ranks_or_single_chain_or_ensembles(tmp_path):
  root = str(tmp_path / "results")
  _fake_entry(root, name="v2")  # No ranks file: deltas, but no p.
  _fake_entry(root, name="diffurec", chains=(2, 4), ndcg=(0.04, 0.05))  # No S = 1: neither.
  lines = ledger_report.ensemble_section(root, ledger.load(root))
  assert "| v2 s0 | 2 | 8.50 | 4.25 | +0.25 | - | - | 50.0 |  |" in lines
  assert "| diffurec s0 | 4 | 10.00 | 5.00 | - | - | - | 25.0 |  |" in lines
  assert not [line for line in lines if "Verdict" in line]  # Nothing tested: no verdict.
  assert [line for line in lines if line.startswith("| diffurec s0 | 2 |")][0].endswith(
      "`python bin/ledger.py ensemble --workdir WORKDIR` |")
  empty = str(tmp_path / "empty")
  os.makedirs(os.path.join(empty, "toys", "v2", "seed0"))
  with open(os.path.join(empty, "toys", "v2", "seed0", "config.json"), "w") as f:
    json.dump({"seed": 0}, f)
  assert ledger_report.ensemble_section(empty, ledger.load(empty)) == []


BETTER = np.array([[2, 3, 5, 8, 9, 12], [1, 2, 3, 4, 6, 7]])  # S = 2 lifts every user.


@pytest.mark.parametrize("ranks, ndcg, words", [
    (RANKS, (0.04, 0.0425, 0.05),
     ["changed no run's NDCG@10 against one chain at p < 0.05; the largest difference is "
      "+1.00 points (v2 s0, S = 4).", "At most 4 of 6 users (66.7%) saw any target rank within "
      "the top 20 move."]),
    (RANKS[[0, 0]], (0.04, 0.04),
     ["the largest difference is +0.00 points (v2 s0, S = 2).", "At most 0 of 6 users (0%)",
      "rank almost exactly as one chain does"]),
    (BETTER, (0.04, 0.06), ["changed NDCG@10 against one chain at p < 0.05 for v2 s0 S = 2 "
                            "(+2.00 points).", "At most 6 of 6 users (100%)"]),
])
def test_ensemble_verdict(tmp_path, ranks, ndcg, words):
  root = str(tmp_path / "results")
  _fake_entry(root, chains=(1, 2, 4)[:len(ranks)], ranks=ranks, ndcg=ndcg)
  (verdict,) = [line for line in ledger_report.ensemble_section(root, ledger.load(root))
                if line.startswith("**Verdict on seed ensembles**")]
  for text in words:
    assert text in verdict, verdict
  assert ("almost exactly" in verdict) == any("almost exactly" in text for text in words)


def test_ranks_file_is_capped_and_small(tmp_path):
  ranks = np.array([[1, 20, 21, 22, 11924], [5, 300, 2, 1, 65536 * 2]])
  ledger.write_ensemble(str(tmp_path), {"rows": []}, np.arange(5), [1, 8], ranks)
  saved = ledger.read_ensemble_ranks(str(tmp_path))
  np.testing.assert_array_equal(saved["ranks"], [[1, 20, 21, 21, 21], [5, 21, 2, 1, 21]])
  np.testing.assert_array_equal(saved["chains"], [1, 8])
  with np.load(tmp_path / ledger.ENSEMBLE_RANKS_FILE) as raw:
    assert raw["ranks"].dtype == np.uint8
  assert ledger.read_ensemble_ranks(str(tmp_path / "none")) is None


# Arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1,2,4,8", (1, 2, 4, 8)), ("8", (8,)), (" 1, 3 ", (1, 3)), ("4,1", (4, 1))])
def test_parse_chains(text, expected):
  assert ensemble_lib.parse_chains(text) == expected


@pytest.mark.parametrize("batch, chains, users", [(64, 1, 64), (64, 2, 32), (64, 8, 8),
                                                  (1024, 8, 128), (64, 128, 1), (10, 4, 2)])
def test_ensemble_config_keeps_the_chains_per_batch(batch, chains, users):
  config = helpers_train.tiny_config(changes={"train.eval_batch_size": batch})
  run_config = ensemble_lib.ensemble_config(config, chains, sharding.make_mesh())
  assert (run_config.sample.seeds, run_config.train.eval_batch_size) == (chains, users)
  assert (config.sample.seeds, config.train.eval_batch_size) == (1, batch)


@pytest.mark.parametrize("arguments, words", [
    (("--seeds", "1,x"), ("--seeds", "integers >= 1")),
    (("--seeds", "0,2"), ("--seeds", "integers >= 1")),
    (("--seeds", ""), ("--seeds",)),
    (("--seeds", "2,2"), ("repeats",)),
    (("--max_users", "-1"), ("--max_users",)),
])
def test_bad_arguments_give_one_line(tmp_path, arguments, words):
  result = helpers_train.run_script("bin/ledger.py", "ensemble", "--workdir", str(tmp_path),
                                    "--entry", str(tmp_path), *arguments)
  helpers_train.assert_user_error(result, *words)


def _copy_entry(entry: str, destination) -> str:
  """A copy of the ledger entry without any recorded ensemble."""
  return str(shutil.copytree(entry, destination / "toys" / "tiny" / "seed0",
                             ignore=shutil.ignore_patterns("ensemble*")))


@pytest.mark.slow  # Needs the shared trained run (its checks themselves take milliseconds).
def test_entry_of_another_run_or_no_entry(trained_workdir, entry, tmp_path):
  run = lambda folder: helpers_train.run_script(
      "bin/ledger.py", "ensemble", "--workdir", str(trained_workdir), "--entry", str(folder))
  other = _copy_entry(entry, tmp_path / "other")
  config = helpers_train.read_json(trained_workdir / "config.json")
  config["seed"], config["model"]["hidden"] = 1, 32
  (pathlib.Path(other) / "config.json").write_text(json.dumps(config))
  helpers_train.assert_user_error(run(other), "is not the run of", "seed, model.hidden")
  helpers_train.assert_user_error(run(tmp_path / "nothing"), "no config.json",
                                  "not a ledger entry")
  assert not os.path.exists(os.path.join(other, ledger.ENSEMBLE_FILE))


@pytest.mark.slow
def test_other_checkpoint_or_no_checkpoint(trained_workdir, entry, tmp_path):
  moved = _copy_entry(entry, tmp_path / "moved")
  results = helpers_train.read_json(trained_workdir / "results.json")
  (pathlib.Path(moved) / "results.json").write_text(
      json.dumps({**results, "best_epoch": results["best_epoch"] + 5}))
  result = helpers_train.run_script("bin/ledger.py", "ensemble", "--workdir",
                                    str(trained_workdir), "--entry", moved)
  helpers_train.assert_user_error(result, f"epoch {results['best_epoch'] + 5}")
  empty = tmp_path / "untrained"
  empty.mkdir()
  for name in ("config.json", "id_map.npz"):
    shutil.copyfile(trained_workdir / name, empty / name)
  result = helpers_train.run_script("bin/ledger.py", "ensemble", "--workdir", str(empty),
                                    "--entry", entry)
  helpers_train.assert_user_error(result, "no validated checkpoint")
