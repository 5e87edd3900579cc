"""The side-by-side benchmark's bookkeeping: medians, ratios, the table, the markers (no torch)."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
sys.path.insert(0, BENCH)
import side_by_side  # noqa: E402

OPTIONS = side_by_side.Options(upstream="/nowhere", rounds=3, variants=("diffurec", "sasrec"),
                               dataset="beauty", steps=10, users=256, users_4seeds=0,
                               eval_batch_size=256, upstream_steps=5, upstream_users=256,
                               markdown=None)


def _ours(train, infer, rss=1000.0):
  return {"train_examples_per_s": train, "infer_users_per_s": infer,
          "infer_users_per_s_1step": infer * 20, "infer_users_per_s_4seeds": infer / 4,
          "train_compile_s": 20.0, "infer_compile_s": 10.0, "train_peak_rss_mb": rss,
          "infer_peak_rss_mb": rss / 2, "batch_size": 512, "max_len": 50,
          "eval_batch_size": 256}


MEASURED = {
    "ours": {"diffurec": [_ours(900.0, 100.0), _ours(700.0, 90.0), _ours(800.0, 500.0)],
             "sasrec": [_ours(3000.0, 4000.0)]},
    "official": [{"train_examples_per_s": 100.0, "infer_users_per_s": 20.0,
                  "train_peak_rss_mb": 4000.0, "infer_peak_rss_mb": 2000.0},
                 {"train_examples_per_s": 160.0, "infer_users_per_s": 25.0,
                  "train_peak_rss_mb": 4100.0, "infer_peak_rss_mb": 2100.0},
                 {"train_examples_per_s": 140.0, "infer_users_per_s": 22.0,
                  "train_peak_rss_mb": 4200.0, "infer_peak_rss_mb": 2000.0}],
}


def test_medians_and_ratios():
  summary = side_by_side.summarise(MEASURED)
  assert summary["diffurec"]["ours"]["train_examples_per_s"] == 800.0  # Median, not mean.
  assert summary["diffurec"]["ours"]["infer_users_per_s"] == 100.0
  assert summary["diffurec"]["official"]["train_examples_per_s"] == 140.0
  ratios = summary["diffurec"]["ratios"]
  assert ratios["train"] == pytest.approx(800 / 140, abs=0.01)
  assert ratios["infer_32_steps"] == pytest.approx(100 / 22, abs=0.01)
  assert ratios["infer_1_step_vs_official_32"] == pytest.approx(2000 / 22, abs=0.01)
  assert ratios["peak_rss_train"] == pytest.approx(1000 / 4100, abs=0.01)
  assert "official" not in summary["sasrec"]  # The official code has no SASRec.


def test_markdown_table_says_where_each_ratio_stands():
  text = side_by_side.markdown(side_by_side.summarise(MEASURED), OPTIONS, "python bench/x")
  assert "| diffurec (512, 50) | ours | 800.0 | 100.0 |" in text
  assert "| diffurec (512, 50) | official | 140.0 | 22.0 |" in text
  assert "training 5.71x (below)" in text
  assert "32-step inference 4.55x (below)" in text
  assert "- diffurec, official: 100.0, 20.0; 160.0, 25.0; 140.0, 22.0" in text


def test_markdown_without_official_code():
  measured = {"ours": MEASURED["ours"], "official": []}
  text = side_by_side.markdown(side_by_side.summarise(measured), OPTIONS, "python bench/x")
  assert "official code not given" in text
  assert "| official |" not in text and "Against the 10x target" not in text


def test_write_between_markers_keeps_the_prose(tmp_path):
  path = tmp_path / "performance.md"
  path.write_text("# Performance\n\nprose before\n")
  side_by_side.write_between_markers(str(path), "table one")
  side_by_side.write_between_markers(str(path), "table two")
  text = path.read_text()
  assert text.startswith("# Performance\n\nprose before\n")
  assert "table two" in text and "table one" not in text
  assert text.count(side_by_side.BEGIN) == 1 and text.count(side_by_side.END) == 1


def test_upstream_bench_without_path_is_one_line_error():
  done = subprocess.run([sys.executable, os.path.join(BENCH, "upstream_throughput.py")],
                        capture_output=True, text=True)
  assert done.returncode != 0
  assert "error: --upstream PATH is required" in done.stderr


def test_side_by_side_rejects_a_wrong_upstream_path():
  with pytest.raises(SystemExit, match="no diffurec.py there"):
    side_by_side.run(OPTIONS)


@pytest.mark.parametrize("args, expected", [
    (["--markdown", "docs/p.md", "--steps", "3"], ["--steps", "3"]),
    (["--markdown=docs/p.md", "--figure=f.png", "--items", "1e4"], ["--items", "1e4"]),
    (["--items", "1e4", "--figure", "f.png"], ["--items", "1e4"]),
    (["--markdownish", "x"], ["--markdownish", "x"]),  # Another flag, kept.
])
def test_recorded_commands_leave_out_where_the_output_went(args, expected):
  assert side_by_side.without_flags(args, ("--markdown", "--figure")) == expected
