"""Metrics as TensorBoard event files, beside metrics.jsonl: `tensorboard --logdir runs/`.

tensorboardX writes the event files without TensorFlow. Every numeric field of a
metrics record becomes a scalar `<split>/<field>` at the record's epoch. Without
tensorboardX installed, nothing is written and training goes on.
"""

from __future__ import annotations

import logging

_SKIPPED = ("epoch", "step", "time")


class EventWriter:
  """Writes metrics records as scalars; opened on the first record (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._writer = None

  def write(self, record: dict):
    if not self.enabled:
      return
    if self._writer is None:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard event files.")
        self.enabled = False
        return
      self._writer = SummaryWriter(logdir=self.workdir, flush_secs=30)
    split, epoch = record.get("split", "metrics"), int(record.get("epoch", 0))
    for name, value in record.items():
      if name not in _SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(f"{split}/{name}", value, global_step=epoch)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
