"""The results ledger: add runs, load them back, rebuild the report from them alone."""

import json
import os

import numpy as np
import pytest

import helpers_train
from helpers_train import trained_run, trained_workdir  # noqa: F401  (fixtures)

from diffurec_jax import config as config_lib
from diffurec_jax.lab import ledger
from diffurec_jax.lab import ledger_report
from diffurec_jax.lab import readme_block
from diffurec_jax.lab import user_tests
from diffurec_jax.lab import verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_workdir(path, *, dataset="toys", variant="diffurec", seed=0, test_ndcg=0.04,
                 finished=True, valid=((1, 60.0, 0.02), (2, 120.0, 0.03), (3, 180.0, 0.029))):
  """A workdir as train.py leaves it: config.json, metrics.jsonl, results.json."""
  os.makedirs(path)
  config = config_lib.base_config()
  config_lib.apply_presets(config, variant)
  config.data.name = dataset
  config.seed = seed
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json())
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for epoch, wall, ndcg in valid:
      f.write(json.dumps({"epoch": epoch, "split": "train", "loss": 9.0, "wall_s": wall - 5})
              + "\n")
      f.write(json.dumps({"epoch": epoch, "split": "valid", "ndcg@10": ndcg, "hit@10": 2 * ndcg,
                          "wall_s": wall}) + "\n")
  best = max(valid, key=lambda v: v[2])
  if finished:
    test = {k: test_ndcg for k in ledger_report.ALL_METRICS}
    test["hit@10"] = 2 * test_ndcg
    with open(os.path.join(path, "results.json"), "w") as f:
      json.dump({"best_epoch": best[0], "epochs_run": len(valid), "test": test,
                 "valid": {"ndcg@10": best[2]}, "wall_s": valid[-1][1] + 30,
                 "mask_history": False, "sample_steps": 32, "valid_users": 100,
                 "valid_steps": 1}, f)
  return path


MACHINE = {"cpu": "Test CPU", "cores": 2, "platform": "cpu", "device": "1 x cpu", "jax": "0"}


def test_add_copies_small_files_and_describes_the_machine(tmp_path):
  work = fake_workdir(str(tmp_path / "w"))
  open(os.path.join(work, "id_map.npz"), "w").close()
  target = ledger.add_run(work, str(tmp_path / "results"), "diffurec", command="python x")
  assert target == str(tmp_path / "results" / "toys" / "diffurec" / "seed0")
  assert sorted(os.listdir(target)) == ["config.json", "metrics.jsonl", "results.json",
                                        "run.json"]
  run = json.load(open(os.path.join(target, "run.json")))
  assert run["command"] == "python x" and run["kind"] == "run"
  assert {"cpu", "cores", "jax", "device", "platform"} <= set(run["machine"])


def test_add_refuses_unfinished_runs_and_overwrites_only_when_asked(tmp_path):
  root = str(tmp_path / "results")
  unfinished = fake_workdir(str(tmp_path / "u"), finished=False)
  with pytest.raises(ledger.LedgerError, match="not finished"):
    ledger.add_run(unfinished, root, "diffurec", command="")
  ledger.add_run(unfinished, root, "trial_a", command="", kind="trial")
  with pytest.raises(ledger.LedgerError, match="--overwrite"):
    ledger.add_run(unfinished, root, "trial_a", command="", kind="trial")
  ledger.add_run(unfinished, root, "trial_a", command="", kind="trial", overwrite=True)


def test_summary_rows_average_seeds_and_read_times(tmp_path):
  root = str(tmp_path / "results")
  for seed, ndcg in ((0, 0.04), (1, 0.05)):
    ledger.add_run(fake_workdir(str(tmp_path / f"w{seed}"), seed=seed, test_ndcg=ndcg), root,
                   "diffurec", command="c", machine=MACHINE)
  (key, runs), = ledger_report.group_runs(ledger.load(root)).items()
  row = ledger_report.summary_row(*key, runs)
  assert row["seeds"] == 2
  assert row["ndcg@10"][0] == pytest.approx(0.045)
  assert row["ndcg@10"][1] == pytest.approx(0.0070710678)
  assert row["minutes_to_best"] == pytest.approx(120.0)  # seconds at the best validation
  assert row["best_epoch"] == [2, 2] and row["stopped_early"] == [True, True]
  assert row["paper"]["ndcg@10"] == pytest.approx(0.0477)  # DiffuRec on Toys, packaged


def test_repeated_epoch_keeps_its_last_record(tmp_path):
  work = fake_workdir(str(tmp_path / "w"))
  with open(os.path.join(work, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"epoch": 2, "split": "valid", "ndcg@10": 0.031, "wall_s": 130}) + "\n")
  ledger.add_run(work, str(tmp_path / "r"), "diffurec", command="")
  entry, = ledger.load(str(tmp_path / "r"))
  assert [r["ndcg@10"] for r in entry.records("valid")] == [0.02, 0.031, 0.029]


def test_report_is_built_from_the_ledger_and_names_no_local_path(tmp_path):
  root = str(tmp_path / "results")
  ledger.add_run(fake_workdir(str(tmp_path / "a"), test_ndcg=0.0466), root, "diffurec",
                 command="python bin/train.py --config configs/toys.py", machine=MACHINE)
  ledger.add_run(fake_workdir(str(tmp_path / "b"), variant="sasrec", test_ndcg=0.035), root,
                 "sasrec", command="python bin/train.py --config configs/toys.py:sasrec",
                 machine=MACHINE)
  ledger.add_run(fake_workdir(str(tmp_path / "c"), finished=False), root, "trial_lr", command="t",
                 kind="trial", notes="lr 2e-3", machine=MACHINE)
  out = str(tmp_path / "docs" / "results.md")
  os.makedirs(os.path.dirname(out))
  ledger_report.write(root, out)
  text = open(out).read()
  assert "| diffurec | 1 | 9.32 | 4.66 | 7.46 / 4.77 (DiffuRec (TOIS 2023)) | -0.11 |" in text
  assert "| sasrec | 1 | 7.00 | 3.50 |" in text
  assert "| trial_lr | lr 2e-3 |" in text
  assert str(tmp_path) not in text and ROOT not in text
  assert os.path.exists(tmp_path / "docs" / "figures" / "ledger_toys_time_to_accuracy.png")


def test_cli_add_and_report(tmp_path):
  work = fake_workdir(str(tmp_path / "w"))
  run = lambda *args: helpers_train.run_script("bin/ledger.py", *args, cwd=tmp_path)
  added = run("add", "--workdir", work, "--name", "diffurec", "--command", "c")
  assert added.returncode == 0, added.stderr
  again = run("add", "--workdir", work, "--name", "diffurec")
  assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
  os.makedirs(tmp_path / "docs")
  (tmp_path / "README.md").write_text(
      f"intro\n{readme_block.BEGIN}\nstale figures\n{readme_block.END}\nend\n")
  built = run("report")
  assert built.returncode == 0, built.stderr
  assert "| diffurec | 1 |" in (tmp_path / "docs" / "results.md").read_text()
  readme = (tmp_path / "README.md").read_text()
  assert readme.startswith(f"intro\n{readme_block.BEGIN}\n| dataset | run |")
  assert "| Amazon Toys | diffurec | 1 | 8.00 | 4.00 | 7.46 / 4.77 |" in readme
  assert "stale" not in readme and readme.endswith(f"\n{readme_block.END}\nend\n")


@pytest.mark.parametrize("text, expected", [
    ("a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb",
     "a\n<!-- results:begin -->\nNEW\n<!-- results:end -->\nb"),
    ("<!-- results:begin --><!-- results:end -->",
     "<!-- results:begin -->\nNEW\n<!-- results:end -->"),
    ("no markers", None),
    ("<!-- results:end --> before <!-- results:begin -->", None),
])
def test_readme_block(text, expected, tmp_path):
  if expected is None:
    with pytest.raises(ValueError):
      readme_block.replace_block(text, "NEW")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert not readme_block.update(str(readme), str(tmp_path / "results"))
    assert readme.read_text() == text
  else:
    assert readme_block.replace_block(text, "NEW") == expected


def test_dataset_notes_are_included_verbatim(tmp_path):
  root = tmp_path / "results"
  ledger.add_run(fake_workdir(str(tmp_path / "a")), str(root), "diffurec", command="c",
                 machine=MACHINE)
  (root / "toys" / "notes.md").write_text("What was tried next: a cosine decay.")
  text = ledger_report.build_markdown(str(root), str(tmp_path / "figures"), "figures")
  assert "What was tried next: a cosine decay." in text


@pytest.mark.parametrize("epochs_run, best, num_epochs, patience, eval_every, expected", [
    (20, 20, 20, 5, 1, False),   # Ran its schedule to the end, best at the last epoch.
    (20, 17, 20, 5, 1, False),   # Ended at its last epoch before patience ran out.
    (20, 15, 20, 5, 1, True),    # Patience ran out exactly at the last epoch.
    (23, 18, 40, 5, 1, True),    # Stopped before num_epochs.
    (83, 73, 56, 10, 1, True),   # Extended by a resume (config.json keeps num_epochs 56).
    (200, 100, 500, 5, 20, True),  # Validation every 20 epochs: 5 validations = 100 epochs.
])
def test_stopped_early(epochs_run, best, num_epochs, patience, eval_every, expected):
  results = {"epochs_run": epochs_run, "best_epoch": best}
  train = {"num_epochs": num_epochs, "patience": patience, "eval_every": eval_every}
  assert ledger_report._stopped_early(results, train) is expected


def test_per_user_ranks_are_kept_compact_and_exact(tmp_path):
  work = fake_workdir(str(tmp_path / "w"))
  users, ranks = np.arange(7, dtype=np.int64), np.array([1, 5, 11, 300, 2, 1, 12000])
  np.savez(os.path.join(work, "test_ranks.npz"), users=users, ranks=ranks,
           targets=users + 1, history_lengths=users + 2)
  target = ledger.add_run(work, str(tmp_path / "r"), "diffurec", command="c", machine=MACHINE)
  saved = ledger.read_ranks(target)
  np.testing.assert_array_equal(saved["users"], users)
  np.testing.assert_array_equal(saved["ranks"], ranks)
  with np.load(os.path.join(target, ledger.RANKS_FILE)) as raw:
    assert raw["ranks"].dtype == np.uint16 and set(raw.files) == {"users", "ranks"}
  assert ledger.read_ranks(str(tmp_path)) is None


def test_user_level_paired_tests_against_each_baseline(tmp_path):
  from scipy import stats
  root, users = str(tmp_path / "r"), np.arange(50)
  rng = np.random.default_rng(0)
  ranks = {"diffurec": rng.integers(1, 30, 50), "sasrec": rng.integers(1, 30, 50),
           "v2": rng.integers(1, 30, 50)}
  for name, values in ranks.items():
    work = fake_workdir(str(tmp_path / name), variant=name)
    np.savez(os.path.join(work, "test_ranks.npz"), users=users, ranks=values)
    ledger.add_run(work, root, name, command="c", machine=MACHINE)
  tests = user_tests.user_tests(root, "toys", ledger.load(root))
  assert [(t["name"], t["baseline"]) for t in tests] == [
      ("sasrec", "diffurec"), ("v2", "diffurec"), ("diffurec", "sasrec"), ("v2", "sasrec")]
  ndcg = {name: user_tests.per_user_ndcg10(values) for name, values in ranks.items()}
  expected = stats.ttest_rel(ndcg["v2"], ndcg["diffurec"])
  (test,) = [t for t in tests if (t["name"], t["baseline"]) == ("v2", "diffurec")]
  assert (test["t"], test["p"], test["pairs"]) == (float(expected.statistic),
                                                   float(expected.pvalue), 50)
  assert "| v2 | diffurec | 1 / 1 | 50 |" in "\n".join(user_tests.user_tests_section(tests))


def test_elapsed_time_counts_the_pause_between_resumes():
  records = [{"split": "train", "epoch": 1, "wall_s": 100.0, "time": 1000.0},
             {"split": "valid", "epoch": 1, "wall_s": 110.0, "time": 1010.0},
             # Killed here; resumed 600 s later: wall_s goes on from 110, time jumps.
             {"split": "train", "epoch": 2, "wall_s": 200.0, "time": 1700.0}]
  assert ledger_report.elapsed_seconds(records) == 100.0 + 700.0
  assert ledger_report.elapsed_seconds([{"split": "train", "wall_s": 5.0}]) is None
  row = {"minutes_total": 200.0, "elapsed_total": 800.0}
  assert ledger_report._elapsed_note(row) == " (elapsed 13.3)"
  assert ledger_report._elapsed_note({"minutes_total": 200.0, "elapsed_total": 205.0}) == ""


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_results_is_the_ledger_rebuilt(tmp_path):
  """docs/results.md is exactly what the ledger in results/ rebuilds (never edited by hand)."""
  text = ledger_report.build_markdown(os.path.join(REPO_ROOT, "results"), str(tmp_path),
                                      "figures")
  with open(os.path.join(REPO_ROOT, "docs", "results.md")) as f:
    assert f.read() == text + "\n"


def test_readme_results_figures_come_from_the_ledger():
  """Every percentage README's results section quotes appears in docs/results.md."""
  import re
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## Results and speed"):readme.index("## Configs")]
  with open(os.path.join(REPO_ROOT, "docs", "results.md")) as f:
    results = f.read()
  quoted = set(re.findall(r"(\d+\.\d+)%", section))
  assert quoted and not {q for q in quoted if q not in results}


def _verdict_row(name, ndcg, seeds=3, paper=None):
  return {"name": name, "ndcg@10": (ndcg, None), "seeds": seeds, "paper": paper,
          "variant": "sasrec" if name == "sasrec" else "v1" if name == "v1" else "diffurec"}


@pytest.mark.parametrize("v1_p, sasrec_p, expected", [
    (0.001, 0.01, ["worse", "does not hold here", "Better than SASRec-CE: diffurec"]),
    (0.5, 0.5, ["not different", "does not hold here", "No diffusion variant"]),
    (0.001, None, ["worse", "higher, untested", "not tested"]),
])
def test_verdict_follows_the_tests(v1_p, sasrec_p, expected):
  rows = [_verdict_row("diffurec", 0.045, paper={"ndcg@10": 0.0477}),
          _verdict_row("v1", 0.040, seeds=2, paper={"ndcg@10": 0.0553}),
          _verdict_row("sasrec", 0.041)]
  tests = [_test("v1", "diffurec", v1_p, 2, 3), _test("diffurec", "sasrec", sasrec_p, 3, 3)]
  text = " ".join(verdict.verdict("Toys", rows, tests))
  for words in expected + ["the paper reports 5.53% against its DiffuRec's 4.77%",
                           "Provisional: v1 2 seeds"]:
    assert words in text, (words, text)


def _test(name, baseline, p, seeds, baseline_seeds, mean_diff=-0.004):
  return {"name": name, "baseline": baseline, "p": p, "seeds": seeds,
          "baseline_seeds": baseline_seeds, "mean_diff": mean_diff}


@pytest.mark.parametrize("tested_seeds, words", [
    ((2, 3), "-0.50 points (paired t over users p = 0.001)"),  # Every seed has ranks.
    ((1, 2), "-0.50 points (paired t over users of the 1 / 2 seeds with ranks: -0.46 points, "
             "p = 0.001)"),  # The test's difference is not the table's.
])
def test_verdict_quotes_the_tested_difference(tested_seeds, words):
  rows = [_verdict_row("diffurec", 0.045), _verdict_row("v1", 0.040, seeds=2)]
  tests = [_test("v1", "diffurec", 0.001, *tested_seeds, mean_diff=-0.0046)]
  text = " ".join(verdict.verdict("Toys", rows, tests))
  assert words in text, text


def test_a_winning_variant_is_named():
  rows = [_verdict_row("diffurec", 0.045), _verdict_row("v1", 0.050)]
  tests = [_test("v1", "diffurec", 0.001, 3, 3)]
  text = " ".join(verdict.verdict("Toys", rows, tests))
  assert "V1 (cross-attention) against DiffuRec" in text and "better" in text
  assert "The DiffuRecSys claim that V1/V2 beat DiffuRec holds here." in text
  assert "Provisional" not in text


@pytest.mark.slow
def test_evaluate_with_lambda_zero_is_recorded(trained_workdir, tmp_path):
  from diffurec_jax import evaluate
  from diffurec_jax.models import bundle as bundle_lib
  loaded = evaluate.load(str(trained_workdir), lambda_zero=True)
  model = bundle_lib.merge(loaded.bundle)
  assert (model.lambda_mean, model.lambda_std) == (0.0, 0.0)
  workdir = helpers_train.copy_workdir(trained_workdir, tmp_path / "run")
  result = helpers_train.run_script("bin/ledger.py", "evaluate", "--workdir", str(workdir),
                                    "--steps", "1", "--lambda0", "--label", "lambda 0")
  assert result.returncode == 0, result.stderr
  saved = json.load(open(workdir / "evaluations" / "lambda_0.json"))
  assert saved["settings"] == {"steps": 1, "sampler": "reverse", "lambda": 0.0}
  assert saved["command"].endswith("--lambda0 --label 'lambda 0'")
