"""Checkpoints of a workdir: the latest N (to resume) and the best on validation (to test).

Two orbax CheckpointManagers under `workdir/checkpoints/{latest,best}`. Each checkpoint holds
the train state pytree (params, optimizer state, step) and a JSON `meta` item (epoch, early-
stopping state, validation history), so a rerun resumes exactly where the last one stopped.
In a multi-process run every process saves and restores (orbax writes each array once and
process 0 the metadata); the workdir must be one directory that every process sees.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from diffurec_jax import errors


class CheckpointError(errors.UserError):
  """A missing, corrupt or incompatible checkpoint, in one sentence for people."""


def manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  """An orbax manager of `directory`. In a multi-process run every process calls its save,
  restore and delete; its barriers are named after the directory ('latest', 'best',
  'interrupted'), because two managers saving the same step at once (latest/2 and best/2)
  would otherwise meet at each other's barriers (both wait on '2.orbax-checkpoint-tmp') and
  one could finalize before every process has written."""
  multiprocessing = ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory)))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         multiprocessing_options=multiprocessing)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpoints:
  """`latest` keeps `keep` checkpoints; `best` keeps the best one only."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.join(workdir, "checkpoints")
    self.latest = manager(os.path.join(self.directory, "latest"), max(keep, 1))
    self.best = manager(os.path.join(self.directory, "best"), 1)

  def save(self, epoch: int, state, meta: dict, *, best: bool):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.latest.save(epoch, args=args)
    if best:
      self.best.save(epoch, args=args)
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def restore(self, which: str, target_state):
    """(state, meta) of the latest step of `which` ('latest' | 'best'), or None if none."""
    manager = self.latest if which == "latest" else self.best
    step = manager.latest_step()
    if step is None:
      return None
    try:
      return restore_step(manager, step, target_state)
    except Exception as error:  # Orbax raises many types for damaged or mismatched files.
      path = os.path.join(manager.directory, str(step))
      raise CheckpointError(
          f"The checkpoint at {path} is corrupt or does not match this config's model "
          f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); delete it to start "
          "over, or use the config it was trained with.") from error

  def close(self):
    self.latest.close()
    self.best.close()


def restore_step(manager, step: int, target_state):
  """(state, meta) saved at `step` by `manager`, shaped like `target_state`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]
