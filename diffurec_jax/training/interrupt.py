"""Ctrl-C and SIGTERM during training: stop at a step boundary, save, say how to resume.

`Interrupts` installs SIGINT/SIGTERM handlers for the duration of a run. While the trainer
runs steps (`deferred`), a signal only sets `requested`; the loop checks it between steps and
saves the partial epoch to `checkpoints/interrupted` (`PartialCheckpoint`). Elsewhere (data
preparation, compilation, validation, testing) the signal raises `Interrupted` at once; the
trainer catches it where there is something to save. A second signal always raises.
`bin/` turns `Interrupted` into one line and exit status 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import orbax.checkpoint as ocp

from diffurec_jax.training import checkpoints as checkpoint_lib

EXIT_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C.


class Interrupted(Exception):
  """The run was interrupted by a signal; the message says what was saved and what to do."""


class Interrupts:
  """Context manager: SIGINT/SIGTERM handlers (main thread only; elsewhere a no-op)."""

  def __init__(self):
    self.requested = False
    self.deferred = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for number in (signal.SIGINT, signal.SIGTERM):
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}
    return False

  def _handle(self, number, frame):
    del frame
    already = self.requested
    self.requested = True
    if self.deferred and not already:
      return  # The training loop stops at the next step boundary.
    raise Interrupted(f"interrupted by {signal.Signals(number).name}")

  @contextlib.contextmanager
  def defer(self):
    """Signals inside this block only set `requested` (steps, checkpoint writes)."""
    previous, self.deferred = self.deferred, True
    try:
      yield
    finally:
      self.deferred = previous

  @contextlib.contextmanager
  def immediate(self):
    """Signals inside this block raise at once (validation, testing: nothing half-written)."""
    previous, self.deferred = self.deferred, False
    try:
      if self.requested:
        raise Interrupted("interrupted by a signal")
      yield
    finally:
      self.deferred = previous


class PartialCheckpoint:
  """`checkpoints/interrupted`: the state in the middle of an epoch, one at a time.

  Its meta is the run's meta (epoch = the last finished epoch) plus `partial`: the position
  in the next epoch's plan, the losses and example count so far, and the train record when
  the interrupt came during validation. Deleted once that epoch's own checkpoint is saved.
  """

  def __init__(self, checkpoints_directory: str):
    self.directory = os.path.join(checkpoints_directory, "interrupted")
    self._manager = None

  def _open(self):
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
      self._manager = ocp.CheckpointManager(os.path.abspath(self.directory), options=options)
    return self._manager

  def exists(self) -> bool:
    return os.path.isdir(self.directory) and any(
        name.isdigit() for name in os.listdir(self.directory))

  def save(self, step: int, state, meta: dict):
    manager = self._open()
    if manager.latest_step() == step:  # Interrupted again before any new step: already saved.
      return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()

  def restore(self, target_state):
    """(state, meta) or None."""
    if not self.exists():
      return None
    manager = self._open()
    step = manager.latest_step()
    if step is None:
      return None
    try:
      return checkpoint_lib.restore_step(manager, step, target_state)
    except Exception as error:  # Orbax raises many types for damaged or mismatched files.
      raise checkpoint_lib.CheckpointError(
          f"The interrupted-epoch checkpoint at {self.directory}/{step} is corrupt or does not "
          f"match this config ({type(error).__name__}); delete {self.directory} to resume "
          "from the last finished epoch instead.") from error

  def delete(self):
    if self.exists():
      manager = self._open()
      for step in manager.all_steps():
        manager.delete(step)
      manager.wait_until_finished()

  def close(self):
    if self._manager is not None:
      self._manager.close()
      self._manager = None
