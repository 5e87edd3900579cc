"""A learning-curve PNG for one run: training loss and validation metrics per epoch.

`plot(workdir)` reads metrics.jsonl (and results.json's selected epoch, once there) and has
`plots.run_learning_curve` draw `workdir/figures/learning_curve.png` (`bin/plot.py --workdir
W`; `bin/train.py` also writes it at the end of training when matplotlib is there).
"""

from __future__ import annotations

import logging
import os

from diffurec_jax.training import workdir as workdir_lib

VALID_METRICS = ("ndcg@10", "hit@10")


def plot(workdir: str, output: str | None = None) -> str:
  """Writes the PNG and returns its path; WorkdirError when there is nothing to plot."""
  records = workdir_lib.MetricsLog(workdir, enabled=False).read()
  train = [r for r in records if r.get("split") == "train"]
  valid = [r for r in records if r.get("split") == "valid"]
  if not train:
    raise workdir_lib.WorkdirError(
        f"{workdir}/metrics.jsonl has no training record yet; train at least one epoch "
        "(bin/train.py) before plotting.")
  from diffurec_jax.lab import plots  # matplotlib is optional (pip install '.[report]').

  valid_points = {}
  for metric in VALID_METRICS:
    points = [(r["epoch"], r[metric]) for r in valid if metric in r]
    if points:
      valid_points[metric] = points
  results = workdir_lib.read_json(workdir, "results.json")
  output = output or os.path.join(workdir, "figures", "learning_curve.png")
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  plots.run_learning_curve([(r["epoch"], r["loss"]) for r in train], valid_points,
                           results["best_epoch"] if results else None,
                           os.path.basename(os.path.normpath(workdir)), output)
  return output


def write_quietly(workdir: str):
  """plot(workdir) at the end of training; skipped (with a log line) without matplotlib."""
  try:
    path = plot(workdir)
  except ImportError:
    logging.info("matplotlib is not installed: no learning-curve PNG (pip install '.[report]').")
    return
  print(f"learning curve: {path}")
