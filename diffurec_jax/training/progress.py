"""What the trainer tells a person about time: step bars, compilation notices, run ETA.

`StepBar` advances on *finished* steps: JAX dispatches asynchronously, so counting dispatched
steps races ahead and then stalls. The bar keeps at most `in_flight` steps queued and blocks
on the oldest one before counting it, which keeps the device busy without serialising the
host and the device. The first step of each new input shape is timed alone and reported as
compilation, and excluded from the throughput.
"""

from __future__ import annotations

import collections
import time

from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
  """'45 s', '12 min', '3 h 05 min'."""
  seconds = max(float(seconds), 0.0)
  if seconds < 90:
    return f"{seconds:.0f} s"
  minutes = seconds / 60
  if minutes < 90:
    return f"{minutes:.0f} min"
  hours, minutes = divmod(int(round(minutes)), 60)
  return f"{hours} h {minutes:02d} min"


class StepBar:
  """A tqdm bar over one epoch's steps that counts finished steps only."""

  def __init__(self, total: int, initial: int, desc: str, enabled: bool, *, in_flight: int = 2,
               notice=print):
    self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                    disable=not enabled, dynamic_ncols=True)
    self.in_flight = max(in_flight, 1)
    self.pending = collections.deque()
    self.compile_seconds = 0.0
    self.notice = notice

  def first_of_shape(self):
    """Call before dispatching a step of a new shape: drains the queue, starts a timer."""
    self.drain()
    return time.time()

  def compiled(self, output, started: float, what: str):
    """Blocks on `output` of a first-of-shape step and reports its compilation time."""
    output.block_until_ready()
    seconds = time.time() - started
    self.compile_seconds += seconds
    self.notice(f"compiled {what} in {seconds:.1f} s")

  def dispatched(self, output):
    """Registers a dispatched step's output; counts the steps that have finished."""
    self.pending.append(output)
    while len(self.pending) > self.in_flight:
      self.pending.popleft().block_until_ready()
      self.bar.update(1)

  def drain(self):
    while self.pending:
      self.pending.popleft().block_until_ready()
      self.bar.update(1)

  def set_loss(self, loss: float):
    self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

  def close(self):
    self.drain()
    self.bar.close()


class RunClock:
  """Estimates the remaining time of a run from the epochs this process has timed."""

  def __init__(self):
    self.train_seconds = []  # Training time of each epoch, compilation excluded.
    self.valid_seconds = []  # Each validation.

  def remaining(self, epochs_left: int, validations_left: int) -> float | None:
    if not self.train_seconds:
      return None
    mean = lambda values: sum(values[-3:]) / len(values[-3:])
    train = mean(self.train_seconds)
    # The first validation includes compiling the sampler: dropped once another is timed.
    valid_seconds = self.valid_seconds[1:] or self.valid_seconds
    valid = mean(valid_seconds) if valid_seconds else train  # A guess until timed.
    return epochs_left * train + validations_left * valid
