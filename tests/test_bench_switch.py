"""The switch benchmark's bookkeeping: overrides, order, medians and ratios (no timing)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
import switch  # noqa: E402


@pytest.mark.parametrize("items, expected", [
    (["catalog.loss=sampled"], ["--config.catalog.loss=sampled"]),
    (["config.catalog.negatives=1024", "train.batch_size=256"],
     ["--config.catalog.negatives=1024", "--config.train.batch_size=256"]),
])
def test_parse_switch(items, expected):
  assert switch.parse_switch(items) == expected


@pytest.mark.parametrize("items", [None, [], ["catalog.loss"], ["=sampled"], ["catalog.loss="]])
def test_parse_switch_refuses_malformed(items):
  with pytest.raises(SystemExit, match="^error: "):
    switch.parse_switch(items)


def test_order_alternates():
  assert [switch.order(k) for k in range(3)] == [("off", "on"), ("on", "off"), ("off", "on")]


def _record(train, rss):
  return {"train_examples_per_s": train, "train_peak_rss_mb": rss}


def test_summarise_medians_and_ratio():
  records = {"off": [_record(1000.0, 900.0), _record(1100.0, 950.0), _record(900.0, 800.0)],
             "on": [_record(700.0, 700.0), _record(800.0, 650.0), _record(750.0, 600.0)]}
  rows = switch.summarise(records, "train")
  assert [row[0] for row in rows] == ["training examples/s", "training peak RSS, MB"]
  assert rows[0][1:] == (1000.0, 750.0, 0.75)
  assert rows[1][1:] == (900.0, 650.0, pytest.approx(650 / 900))


def test_parts():
  assert switch.parts("both") == ("train", "infer")
  assert switch.parts("infer") == ("infer",)


def test_importing_defines_no_flags():
  """bin/ scripts run in the test process define --config, --steps...: the bench must not."""
  from absl import flags
  assert "switch" not in flags.FLAGS and "name" not in flags.FLAGS


def test_markdown_table():
  records = {"off": [_record(1000.0, 900.0), _record(800.0, 900.0)],
             "on": [_record(500.0, 800.0), _record(700.0, 800.0)]}
  text = switch.markdown(records, switch.summarise(records, "train"), "python bench/switch.py",
                         "train", 3)
  assert "| training examples/s | 900.0 | 600.0 | **0.67x** |" in text
  assert "Medians of 2 rounds" in text
  assert text.endswith("Per round (train_examples_per_s, off; on): 1000.0; 500.0; 800.0; 700.0")


@pytest.mark.parametrize("load, cores, warns", [(0.3, 2, False), (1.0, 2, False), (1.6, 2, True),
                                                (3.0, 8, False)])
def test_load_warning(load, cores, warns):
  warning = switch.load_warning(load, cores)
  assert (warning is not None) is warns
  if warns:
    assert warning.startswith("warning: load average 1.60 on 2 cores")


def test_markdown_says_when_the_machine_was_busy():
  records = {"off": [_record(1000.0, 900.0)], "on": [_record(500.0, 800.0)]}
  rows = switch.summarise(records, "train")
  busy = switch.markdown(records, rows, "cmd", "train", 3, switch.load_warning(1.6, 2))
  assert "load average 1.60 on 2 cores at the start (other work running)" in busy
  assert "nothing else running" not in busy
  assert "nothing else running" in switch.markdown(records, rows, "cmd", "train", 3)
