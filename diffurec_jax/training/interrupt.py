"""Ctrl-C and SIGTERM during training: stop at a step boundary, save, say how to resume.

`Interrupts` installs SIGINT/SIGTERM handlers for the duration of a run. While the trainer
runs steps (`deferred`), a signal only sets `requested`; the loop checks it between steps and
saves the partial epoch to `checkpoints/interrupted` (`PartialCheckpoint`). Elsewhere (data
preparation, compilation, validation, testing) the signal raises `Interrupted` at once; the
trainer catches it where there is something to save. A second signal always raises.
`bin/` turns `Interrupted` into one line and exit status 130.

In a multi-process run a signal reaches one process (a Ctrl-C in one terminal) or reaches
several at different steps, and a process that stops alone leaves the others waiting in a
collective. There a first signal never raises: the trainer asks `stop_at_step` at every step
boundary and `stop_now` between its phases, and every process gets the same answer at the
same point (`StopVote`), so all of them save the same checkpoint and stop.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from diffurec_jax.training import checkpoints as checkpoint_lib

EXIT_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C.


class Interrupted(BaseException):
  """The run was interrupted by a signal; the message says what was saved and what to do.

  A BaseException, as KeyboardInterrupt is, so that a library's `except Exception` (JAX's
  compilation-cache read, orbax) cannot swallow it and carry on.
  """


NOTICE_AFTER_S = 2.0  # A signal not acted on by then waits for a step or an XLA compilation.
NOTICE = ("stopping: a step or compilation in progress finishes first (up to a minute); "
          "press Ctrl-C again to stop without saving")


class Interrupts:
  """Context manager: SIGINT/SIGTERM handlers (main thread only; elsewhere a no-op).

  A signal that arrives during a long XLA compilation (or a long step) is acted on only after
  it. A watcher thread reads the signal's wake-up byte at once and, if the run has not acted on
  it within NOTICE_AFTER_S (raised, or read `requested` at a step boundary), prints NOTICE, so
  the user knows the Ctrl-C was seen. An Interrupted raised where Python cannot propagate it (a garbage-collector
  callback) is not printed as "Exception ignored": `requested` is set, and the trainer stops at
  its next check.

  `collective` (default: more than one process) defers the first signal everywhere, validation
  and testing included; the trainer stops where `stop_at_step` or `stop_now` says so.
  """

  def __init__(self, collective: bool | None = None):
    self._requested = False
    self.deferred = False
    self.collective = jax.process_count() > 1 if collective is None else collective
    self._vote = StopVote() if self.collective else None
    self._previous = {}
    self._handled = 0  # Signals whose Python handler has run.
    self._acted_on = 0  # Of those, signals the run has acted on.
    self._wakeup = None

  @property
  def requested(self) -> bool:
    """Whether a signal came; reading True is acting on it (the caller stops)."""
    if self._requested:
      self._acted_on = self._handled
    return self._requested

  @requested.setter
  def requested(self, value: bool):
    self._requested = value

  def stop_at_step(self) -> bool:
    """Call at every step boundary: whether to stop here (the same in every process)."""
    if self._vote is None:
      return self.requested
    return self._vote.at_step(self.requested)

  def stop_now(self) -> bool:
    """Call between phases (after an epoch's steps, after its checkpoint): whether to stop
    here; in a multi-process run a synchronous vote that also settles the step votes."""
    if self._vote is None:
      return self.requested
    return self._vote.now(self.requested)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for number in (signal.SIGINT, signal.SIGTERM):
        self._previous[number] = signal.signal(number, self._handle)
      self._start_watcher()
      self._unraisable, sys.unraisablehook = sys.unraisablehook, self._quiet_unraisable
    return self

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    if self._previous:
      sys.unraisablehook = self._unraisable
      self._stop_watcher()
    self._previous = {}
    return False

  def _start_watcher(self):
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    self._wakeup = (read, write, previous)
    threading.Thread(target=self._watch, args=(read,), daemon=True,
                     name="interrupt-notice").start()

  def _stop_watcher(self):
    read, write, previous = self._wakeup
    signal.set_wakeup_fd(previous)
    os.close(write)  # The watcher's read returns b'' and it ends; it closes `read`.
    self._wakeup = None

  def _watch(self, read: int):
    """Counts our signals' wake-up bytes; NOTICE when one is not handled in time."""
    ours, seen = {int(signal.SIGINT), int(signal.SIGTERM)}, 0
    try:
      while byte := os.read(read, 1):
        if byte[0] not in ours:
          continue
        seen += 1
        deadline = time.monotonic() + NOTICE_AFTER_S
        while self._acted_on < seen and time.monotonic() < deadline:
          time.sleep(0.02)
        if self._acted_on < seen and self._wakeup is not None:
          tqdm.write(NOTICE, file=sys.stderr)  # On its own line, under any progress bar.
    except OSError:
      pass
    finally:
      os.close(read)

  def _quiet_unraisable(self, unraisable):
    if not isinstance(unraisable.exc_value, Interrupted):
      self._unraisable(unraisable)

  def _handle(self, number, frame):
    del frame
    self._handled += 1
    already = self._requested
    self._requested = True
    if (self.deferred or self.collective) and not already:
      return  # The training loop stops at the next step boundary (or agreed point).
    self._acted_on = self._handled
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
    """Signals inside this block raise at once (validation, testing: nothing half-written);
    in a collective run they wait for the next `stop_now` (the others cannot stop here)."""
    if self.collective:
      yield
      return
    previous, self.deferred = self.deferred, False
    try:
      if self.requested:
        raise Interrupted("interrupted by a signal")
      yield
    finally:
      self.deferred = previous


class StopVote:
  """Whether any process of a multi-process run was asked to stop, agreed by all of them.

  `at_step(asked)` dispatches an all-process OR of every process's `asked` and returns the OR
  dispatched LAG boundaries earlier (False until then): every process reads the same vote at
  the same boundary, and reading a vote LAG steps old does not make the host wait for the
  device (the step bar keeps as many steps in flight). `now(asked)` votes again and settles
  every pending vote. Every process must call them at the same points, in the same order.
  """

  LAG = 2

  def __init__(self):
    devices = np.array(jax.devices())  # One flag per device: the flag of its process.
    mesh = jax.sharding.Mesh(devices, ("processes",))
    self._flags = NamedSharding(mesh, PartitionSpec("processes"))
    self._any = jax.jit(lambda flags: flags.max(), out_shardings=NamedSharding(
        mesh, PartitionSpec()))
    self._pending = collections.deque()

  def _dispatch(self, asked: bool):
    flags = jax.make_array_from_callback((self._flags.mesh.size,), self._flags,
                                         lambda index: np.full(1, int(asked), np.int32))
    self._pending.append(self._any(flags))

  def at_step(self, asked: bool) -> bool:
    self._dispatch(asked)
    return len(self._pending) > self.LAG and bool(self._pending.popleft())

  def now(self, asked: bool) -> bool:
    self._dispatch(asked)
    votes = [bool(vote) for vote in self._pending]
    self._pending.clear()
    return any(votes)


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
      self._manager = checkpoint_lib.manager(self.directory, 1)
    return self._manager

  def exists(self) -> bool:
    if self._manager is not None:  # Its view is every process's (a listing could see process
      return bool(self._manager.all_steps())  # 0 delete it while another one looks).
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
