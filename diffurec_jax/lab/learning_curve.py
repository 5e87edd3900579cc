"""A learning-curve PNG for one run: training loss and validation metrics per epoch.

`plot(workdir)` reads metrics.jsonl and writes `workdir/figures/learning_curve.png`
(`bin/plot.py --workdir W`; also written at the end of training when matplotlib is there).
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
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  figure, (loss_axis, valid_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
  loss_axis.plot([r["epoch"] for r in train], [r["loss"] for r in train], marker="o", ms=3)
  loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss")
  for metric in VALID_METRICS:
    points = [(r["epoch"], r[metric]) for r in valid if metric in r]
    if points:
      valid_axis.plot(*zip(*points), marker="o", ms=3, label=metric)
  results = workdir_lib.read_json(workdir, "results.json")
  if results:
    valid_axis.axvline(results["best_epoch"], color="grey", ls=":", label="selected epoch")
  valid_axis.set(xlabel="epoch", ylabel="validation", title="validation")
  if valid:
    valid_axis.legend()
  for axis in (loss_axis, valid_axis):
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  figure.suptitle(os.path.basename(os.path.normpath(workdir)))
  figure.tight_layout()
  output = output or os.path.join(workdir, "figures", "learning_curve.png")
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  figure.savefig(output, dpi=110)
  plt.close(figure)
  return output


def write_quietly(workdir: str):
  """plot(workdir) at the end of training; skipped (with a log line) without matplotlib."""
  try:
    path = plot(workdir)
  except ImportError:
    logging.info("matplotlib is not installed: no learning-curve PNG (pip install '.[report]').")
    return
  print(f"learning curve: {path}")
