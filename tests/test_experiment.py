"""The experiment runner and its report: hand-computed analyses, then one smoke-size grid.

The grid (diffurec and sasrec x 2 seeds on the session's synthetic data, plus the steps1
re-evaluation of the diffurec runs) is one module fixture: 4 tiny runs of the session's tiny
shape (helpers_train), so they reuse the shared run's executables from the persistent cache.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

import ml_collections
import numpy as np
import pytest
from scipy import stats

import helpers_train

from diffurec_jax.lab import analysis
from diffurec_jax.lab import experiment
from diffurec_jax.lab import report as report_lib
from diffurec_jax.lab import report_markdown

REPO = pathlib.Path(__file__).resolve().parents[1]
GRID = ("diffurec", "sasrec", "steps1")  # As given to --variants.
VARIANTS = ("diffurec", "sasrec", "diffurec+steps1")  # Canonical names.
SEEDS = 2


# Hand-computed analyses ---------------------------------------------------------------------


def test_metrics_from_ranks_table():
  result = analysis.metrics_from_ranks([1, 3, 10, 11], ("hit@10", "ndcg@10", "mrr@10"))
  assert result["users"] == 4
  assert result["hit@10"] == 0.75
  assert result["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4, abs=1e-15)
  assert result["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 4, abs=1e-15)
  assert analysis.metrics_from_ranks([]) == {"users": 0, "hit@10": None, "ndcg@10": None}


def test_head_items_and_head_tail_metrics():
  # Items 1..10; the top 20% are 2 items: item 4 (count 9), then item 2, which ties item 7
  # (count 5) and wins by its lower index.
  counts = np.array([0, 1, 5, 0, 9, 1, 1, 5, 2, 0, 1])
  head = analysis.head_items(counts)
  assert head.tolist() == [False, False, True, False, True] + [False] * 6
  targets = np.array([4, 2, 7, 1, 4])
  ranks = np.array([1, 3, 2, 15, 11])
  split = analysis.head_tail_metrics(ranks, targets, head)
  # Head users: ranks 1, 3, 11 -> hit 2/3, ndcg (1 + 0.5 + 0) / 3; tail: ranks 2, 15.
  assert split["head"] == {"users": 3, "hit@10": 2 / 3, "ndcg@10": 0.5}
  assert split["tail"]["users"] == 2 and split["tail"]["hit@10"] == 0.5
  assert split["tail"]["ndcg@10"] == pytest.approx(1 / math.log2(3) / 2, abs=1e-15)
  # ceil(0.2 * 3) = 1 head item out of 3.
  assert analysis.head_items([0, 2, 3, 1]).tolist() == [False, False, True, False]


def test_length_groups_table():
  lengths = np.arange(1, 11)  # 10 users, lengths 1..10.
  edges = analysis.length_edges(lengths)
  assert edges == pytest.approx([1.0, 2.8, 4.6, 6.4, 8.2, 10.0])
  assert analysis.length_group_index(lengths, edges).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  ranks = np.array([1, 20, 3, 3, 2, 50, 1, 1, 7, 30])
  groups = analysis.length_group_metrics(ranks, lengths, edges)
  assert [g["users"] for g in groups] == [2, 2, 2, 2, 2]
  assert [g["hit@10"] for g in groups] == [0.5, 1.0, 0.5, 1.0, 0.5]
  assert groups[1]["ndcg@10"] == 0.5 and groups[4]["ndcg@10"] == 1 / 3 / 2
  assert analysis.group_labels(edges)[-1] == "[8.2, 10]"
  # Ties: many length-4 histories repeat an edge, leaving group 0 empty (not split).
  tied = np.array([4, 4, 4, 4, 4, 4, 5, 6, 9, 20])
  edges = analysis.length_edges(tied)
  assert edges[:3] == [4.0, 4.0, 4.0]
  groups = analysis.length_group_metrics(np.ones(10), tied, edges)
  assert [g["users"] for g in groups] == [0, 0, 6, 2, 2]
  assert groups[0]["hit@10"] is None


def test_paired_tests_match_scipy_and_say_why_not():
  ours, theirs = [0.3, 0.5, 0.4], [0.2, 0.45, 0.41]
  test = analysis.paired_test(ours, theirs)
  expected = stats.ttest_rel(ours, theirs)
  assert (test["t"], test["p"]) == (float(expected.statistic), float(expected.pvalue))
  assert analysis.paired_test([0.3], [0.2])["p"] is None
  constant = analysis.paired_test([1.0, 2.0], [0.0, 1.0])  # scipy would say t = inf, p = 0.
  assert constant["t"] is None and "zero variance" in constant["note"]
  assert analysis.paired_test([0.1, 0.2], [0.1, 0.2])["note"].startswith("identical")
  overall = analysis.overall_test({"a": [1.0, 2.0], "b": [3.0, 0.0]},
                                  {"a": [2.0, 1.0], "b": [2.0, 0.0]}, keys=("a", "b"))
  assert overall["pairs"] == 4 and overall["relative_pairs"] == 3
  assert overall["avg_relative_diff_percent"] == pytest.approx((-50 + 100 + 50) / 3)
  assert overall["avg_diff_points"] == pytest.approx(25.0)


def fake_table3(per_seed: dict) -> dict:
  return {name: {"per_seed": {"ndcg@10": values}, "seeds": len(values),
                 "metrics": {"ndcg@10": analysis.seed_summary(values)}}
          for name, values in per_seed.items()}


def test_diffusion_answer():
  from diffurec_jax.lab import report
  assert "not run" in report.diffusion_answer(fake_table3({"diffurec": [0.1]}))["sentence"]
  lower = report.diffusion_answer(fake_table3({
      "diffurec": [0.10, 0.20, 0.30], "diffurec+lambda0": [0.05, 0.14, 0.26]}))
  (comparison,) = lower["comparisons"]
  assert comparison["p"] == float(stats.ttest_rel([0.05, 0.14, 0.26], [0.10, 0.20, 0.30]).pvalue)
  assert comparison["p"] < 0.05 and comparison["verdict"] == "helps"
  assert lower["sentence"].startswith("Does the diffusion component matter? Yes")
  assert "steps1 ablation was not run" in lower["sentence"]
  same = report.diffusion_answer(fake_table3({
      "v2": [0.1, 0.2], "v2+steps1": [0.1, 0.2], "v2+lambda0": [0.3, 0.1]}))
  assert [c["verdict"] for c in same["comparisons"]] == ["identical",
                                                         "no evidence of a difference"]
  assert "No evidence" in same["sentence"]


def test_extract_overrides_toy():
  default = ml_collections.ConfigDict({"seed": 0, "model": {"hidden": 128, "mixing": "add"},
                                       "train": {"length_buckets": (4, 8)}})
  loaded = ml_collections.ConfigDict(default.to_dict())
  loaded.model.hidden = 16
  loaded.train.length_buckets = ()
  assert experiment.extract_overrides(loaded, default) == {
      "model.hidden": 16, "train.length_buckets": ()}
  # A flag set to its default value still counts when named explicitly.
  assert experiment.extract_overrides(loaded, default, explicit=["model.mixing"]) == {
      "model.hidden": 16, "model.mixing": "add", "train.length_buckets": ()}
  config = experiment.apply_overrides(ml_collections.ConfigDict(default.to_dict()),
                                      {"model.hidden": 16, "train.length_buckets": []})
  assert config.model.hidden == 16 and config.train.length_buckets == ()
  with pytest.raises(ValueError, match="model.width is not a field"):
    experiment.apply_overrides(config, {"model.width": 3})


@pytest.mark.parametrize("name, canonical, presets, steps", [
    ("diffurec", "diffurec", ("diffurec",), 0),
    ("lambda0", "diffurec+lambda0", ("diffurec", "lambda0"), 0),
    ("v2+nopos", "v2+nopos", ("v2", "nopos"), 0),
    ("v1+nopos+steps1", "v1+nopos+steps1", ("v1", "nopos"), 1),
    ("steps1", "diffurec+steps1", ("diffurec",), 1),
    ("v2+nopos+steps1", "v2+nopos+steps1", ("v2", "nopos"), 1),
])
def test_parse_variant(name, canonical, presets, steps):
  variant = experiment.parse_variant(name)
  assert (variant.name, variant.presets, variant.steps) == (canonical, presets, steps)


@pytest.mark.parametrize("names, message", [
    (["foo"], "Unknown variant"), (["diffurec+bar"], "Bad ablation"),
    (["sasrec+lambda0"], "SASRec"), (["steps1+nopos"], "inference ablation last"),
])
def test_bad_variants(names, message):
  with pytest.raises(ValueError, match=message):
    experiment.parse_variants(names)


def test_steps1_brings_its_source_and_bad_seeds():
  assert [v.name for v in experiment.parse_variants(["v2", "steps1"])] == [
      "v2", "diffurec", "diffurec+steps1"]
  with pytest.raises(ValueError, match="seeds"):
    experiment.run_experiment("configs/toys.py", "", {}, ["diffurec"], 0, "/nonexistent")
  with pytest.raises(ValueError, match="not in --variants"):
    experiment.run_experiment("configs/toys.py", "", {}, ["diffurec", "v1"], 1, "/nonexistent",
                              baselines=["sasrec"])


@pytest.mark.parametrize("baselines, expected", [
    (("diffurec", "sasrec"), [("v1", "diffurec"), ("sasrec", "diffurec"), ("v1", "sasrec")]),
    (("v1",), [("diffurec", "v1"), ("sasrec", "v1")]),
    (("v2",), []),  # Not in the grid.
])
def test_table4_tests_every_variant_against_each_baseline_once(baselines, expected):
  per_seed = {key: [0.1, 0.2] for key in analysis.RESULT_KEYS}
  t3 = {name: {"per_seed": per_seed} for name in ("diffurec", "v1", "sasrec")}
  pairs = [(c["variant"], c["baseline"]) for c in report_lib.table4(t3, baselines)]
  assert pairs == expected


# One smoke-size grid ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  # The shared tiny run's config (helpers_train.cli_flags): its diffurec programs are reused.
  overrides = {**helpers_train.TINY, "data.path": str(helpers_train.SYNTHETIC_LOG),
               "data.root": str(helpers_train.SYNTHETIC_DIR), "train.num_epochs": 1,
               "train.max_steps_per_epoch": 2}
  workdir = str(tmp_path_factory.mktemp("grid"))
  args = (str(REPO / "configs" / "custom.py"), "smoke", overrides, list(GRID), SEEDS, workdir)
  start = time.time()
  report = experiment.run_experiment(*args, command="test", progress=False)
  return {"args": args, "report": report, "workdir": workdir, "seconds": time.time() - start}


def per_run(workdir, name):
  return [json.load(open(os.path.join(workdir, name, f"seed{seed}", "results.json")))
          for seed in range(SEEDS)]


@pytest.mark.slow
def test_grid_tables_equal_the_runs(grid):
  report, workdir = grid["report"], grid["workdir"]
  assert json.load(open(os.path.join(workdir, "report.json"))) == json.loads(json.dumps(report))
  for key in ("runs", "table3", "table4", "head_tail", "length_groups", "diffusion", "figures",
              "tsne", "command", "machine", "published"):
    assert key in report, key
  assert report["mask_history"] is False and report["seeds"] == SEEDS
  assert list(report["table3"]) == list(VARIANTS)
  for name in VARIANTS:
    runs = per_run(workdir, name)
    assert [run["variant"] for run in runs] == [name.split("+")[0]] * SEEDS
    assert [run["seed"] for run in runs] == list(range(SEEDS))
    for key in analysis.RESULT_KEYS:
      values = [run["test"][key] for run in runs]
      summary = report["table3"][name]["metrics"][key]
      assert summary["mean"] == float(np.mean(values))
      assert summary["std"] == float(np.std(values, ddof=1))
    assert report["table3"][name]["best_epochs"] == [run["best_epoch"] for run in runs]
    assert all(run["wall_seconds"] > 0 for run in report["runs"][name])
  assert report["published"] == {}  # None for a custom dataset (test_published_column).


def assert_scipy(test, ours, theirs):
  """Our t and p equal scipy's on the same numbers, or are None for a stated reason."""
  if test["t"] is None:
    assert np.ptp(np.subtract(ours, theirs)) == 0 and test["note"]
  else:
    expected = stats.ttest_rel(ours, theirs)
    assert (test["t"], test["p"]) == (float(expected.statistic), float(expected.pvalue))


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
@pytest.mark.slow
def test_grid_ttests_equal_scipy(grid):
  report, workdir = grid["report"], grid["workdir"]
  pairs = {(c["variant"], c["baseline"]) for c in report["table4"]}
  assert pairs == {(v, "diffurec") for v in VARIANTS if v != "diffurec"} | {
      (v, "sasrec") for v in VARIANTS if v not in ("diffurec", "sasrec")}
  for c in report["table4"]:
    ours, theirs = per_run(workdir, c["variant"]), per_run(workdir, c["baseline"])
    for key in analysis.RESULT_KEYS:
      assert_scipy(c["per_metric"][key], [r["test"][key] for r in ours],
                   [r["test"][key] for r in theirs])
    assert_scipy(c["overall"], [r["test"][k] for k in analysis.RESULT_KEYS for r in ours],
                 [r["test"][k] for k in analysis.RESULT_KEYS for r in theirs])


@pytest.mark.slow
def test_grid_groups_and_answer(grid):
  report, workdir = grid["report"], grid["workdir"]
  users = len(np.load(os.path.join(workdir, "diffurec", "seed0", "test_ranks.npz"))["ranks"])
  for name in VARIANTS:
    head_tail = report["head_tail"]["variants"][name]
    assert head_tail["head"]["users"] + head_tail["tail"]["users"] == users
    groups = report["length_groups"]["variants"][name]["groups"]
    assert len(groups) == 5 and sum(g["users"] for g in groups) == users
    ranks = [np.load(os.path.join(workdir, name, f"seed{s}", "test_ranks.npz"))["ranks"]
             for s in range(SEEDS)]
    # The groups' weighted mean over users gives back the run's own hit@10, seed-averaged.
    hit = sum(g["hit@10"] * g["users"] for g in groups if g["users"]) / users
    assert hit == pytest.approx(np.mean([np.mean(r <= 10) for r in ranks]), abs=1e-12)
    assert hit == pytest.approx(report["table3"][name]["metrics"]["hit@10"]["mean"], abs=1e-12)
  sentence = report["diffusion"]["sentence"]
  assert "diffurec+steps1" in sentence and "lambda0 ablation was not run" in sentence


@pytest.mark.slow
def test_grid_steps1_reevaluates_the_diffurec_runs(grid):
  workdir = grid["workdir"]
  for seed, (source, ablation) in enumerate(zip(per_run(workdir, "diffurec"),
                                                per_run(workdir, "diffurec+steps1"))):
    assert (ablation["sample_steps"], source["sample_steps"]) == (1, 32)
    assert ablation["best_epoch"] == source["best_epoch"]
    assert ablation["reevaluated_from"].endswith(os.path.join("diffurec", f"seed{seed}"))
    assert not os.path.exists(os.path.join(workdir, "diffurec+steps1", f"seed{seed}",
                                           "checkpoints"))
  assert grid["report"]["runs"]["diffurec+steps1"][0]["train_seconds"] == 0


@pytest.mark.slow
def test_grid_markdown_and_figures(grid):
  workdir = grid["workdir"]
  text = open(os.path.join(workdir, "report.md")).read()
  for heading in ("Table 3", "Table 4", "Head and tail", "History-length groups",
                  "Does the diffusion component matter?", "No published reference numbers",
                  "history items masked from the ranking: no", "2 seed(s)", "test"):
    assert heading in text, heading
  for path in grid["report"]["figures"].values():
    assert f"]({path})" in text
    assert os.path.getsize(os.path.join(workdir, path)) > 1000


@pytest.mark.slow
def test_grid_rerun_skips_training(grid):
  start = time.time()
  report = experiment.run_experiment(*grid["args"], command="test", progress=False)
  assert report == grid["report"]
  assert time.time() - start < 0.5 * grid["seconds"], (time.time() - start, grid["seconds"])


def test_published_column():
  """Table 3 puts a dataset's published figures beside the measured ones, marked and sourced."""
  metrics = {key: {"mean": 0.5, "std": None} for key in analysis.RESULT_KEYS}
  report = {"table3": {"diffurec": {"metrics": metrics, "seeds": 1, "best_epochs": [3]}},
            "published": report_lib.published_results("toys"), "published_source": "papers",
            "dataset": "toys", "mask_history": False, "seeds": 1, "split": "test"}
  text = report_markdown.table3_section(report)
  assert "published, not measured here (source: `papers`)" in text
  assert all(f"{label} †" in text for label in report["published"])
