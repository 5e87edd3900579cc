"""Training and model selection: `train_and_evaluate(config, workdir)`.

`build_run` (state.py) assembles the step, the optimizer and the epoch plans; a `Run` trains
the epochs around them: validation every `eval_every` epochs with early stopping on the
validation metric (selection.py), a checkpoint every epoch, the best checkpoint tested once
at the end. A rerun on the same workdir resumes from the latest checkpoint; a finished run
says so and returns its results (and writes nothing).

Config values are checked before anything is read (config_check). SIGINT/SIGTERM stop at the
next step boundary and save the partial epoch (interrupt.PartialCheckpoint): the epoch plan is
a function of (seed, epoch) and each step's RNG of the step number, so (state, position,
losses so far) resume it bit-identically. Progress: a bar of finished steps per epoch, a
notice per compilation, and the run's remaining time after each epoch (progress).

In a multi-process run (jax.distributed) every process runs this loop on the same plans and
feeds its own rows of each batch; all of them save and restore the checkpoints (orbax
coordinates them; the workdir must be one directory that every process sees), process 0 alone
writes the rest of the workdir and prints, and a signal stops all of them at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffurec_jax import config_check
from diffurec_jax import data as data_lib
from diffurec_jax import errors
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax import metrics
from diffurec_jax import sharding
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.training import checkpoints as checkpoint_lib
from diffurec_jax.training import interrupt as interrupt_lib
from diffurec_jax.training import progress as progress_lib
from diffurec_jax.training import selection
from diffurec_jax.training import state as state_lib
from diffurec_jax.training import tensorboard as tensorboard_lib
from diffurec_jax.training import workdir as workdir_lib


class Diverged(errors.UserError, FloatingPointError):
  """The training loss became NaN or infinite; the message names the last good checkpoint."""


@dataclasses.dataclass
class Meta:
  """The run's progress, saved as JSON beside every checkpoint (these keys, these names).

  epoch: the last finished epoch. best_*: the selected checkpoint and the best validation
  values so far. bad_evals: validations since the last improvement. stopped: early stopping
  fired. wall_s: wall-clock seconds so far, resumes included. partial: set only in the
  interrupted-epoch checkpoint (position, losses, count, seconds, train_record).
  """
  epoch: int = 0
  best_epoch: int = 0
  best_metric: float = -math.inf
  bad_evals: int = 0
  wall_s: float = 0.0
  best_valid: dict = dataclasses.field(default_factory=dict)
  stopped: bool = False
  partial: dict | None = None

  @classmethod
  def from_json(cls, payload: dict) -> Meta:
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in payload.items() if k in names})

  def to_json(self, **changes) -> dict:
    payload = dataclasses.asdict(dataclasses.replace(self, **changes))
    if payload["partial"] is None:
      del payload["partial"]
    return payload


def _check_finite(losses, first_step: int, epoch: int, checkpoints):
  values = np.asarray(jax.device_get(losses), dtype=np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    last = checkpoints.latest.latest_step()
    where = f"epoch {last} in {checkpoints.directory}/latest" if last is not None else "none yet"
    raise Diverged(
        f"The training loss is {values[bad[0]]} at step {step} (epoch {epoch}); last good "
        f"checkpoint: {where}. Lower train.learning_rate or set train.grad_clip and rerun"
        + (f" (it resumes from epoch {last})." if last is not None else "."))
  return values


def train_and_evaluate(config, workdir: str, *, stop_after_epochs: int | None = None,
                       stop_after_steps: int | None = None,
                       progress: bool = True) -> dict | None:
  """Trains, selects on validation, tests the best checkpoint once; returns results.json.

  `stop_after_epochs` ends this call after that many epochs without finishing the run (as a
  kill would): rerunning resumes. Returns None in that case. `stop_after_steps` acts as a
  Ctrl-C after that many steps of this call: the partial epoch is saved and
  `interrupt.Interrupted` raised. SIGINT/SIGTERM do the same at the next step boundary.
  """
  config_check.validate(config)  # Before any data is read or any step compiled.
  finished = workdir_lib.read_json(workdir, "results.json")
  if finished is not None:  # A finished run is never written to (it may be read-only).
    workdir_lib.check_config(workdir, config)
    logging.info("%s is finished (results.json exists); nothing to do.", workdir)
    if sharding.is_main_process():
      print(f"{workdir}: run already finished; results in {workdir}/results.json")
    return finished
  with interrupt_lib.Interrupts() as interrupts, contextlib.ExitStack() as stack:
    run = Run(config, workdir, interrupts, stack, progress=progress)
    try:
      return run.train(stop_after_epochs, stop_after_steps)
    except interrupt_lib.Interrupted as error:
      if str(error).startswith("interrupted by"):  # Straight from the signal handler.
        raise interrupt_lib.Interrupted(run.status) from None
      raise


class Run:
  """One training run in its workdir: resume, epochs, validation, checkpoints, the test.

  Everything that must be closed (the workdir lock, checkpoint managers, event files) is
  entered on `stack`, so every way out (finished, stopped, interrupted, failed) closes it.
  `status` says, at any moment, what an interrupt now would leave behind.
  """

  def __init__(self, config, workdir: str, interrupts, stack: contextlib.ExitStack, *,
               progress: bool = True):
    self.config, self.workdir = config, workdir
    self.interrupts, self.stack = interrupts, stack
    self.main = sharding.is_main_process()
    self.progress = progress and self.main
    self.status = ("interrupted before training started; nothing was trained; rerun the same "
                   "command to start")

  def say(self, message: str):
    if self.main:
      tqdm.write(message)

  def announce(self, message: str):
    """print() in process 0 only: the other processes of a multi-process run stay quiet."""
    if self.main:
      print(message, flush=True)

  # Set-up --------------------------------------------------------------------------------------

  def _open(self):
    """Lock and check the workdir, prepare the data, build the run, open its files."""
    config, workdir = self.config, self.workdir
    if self.main:
      workdir_lib.check_writable(workdir)
      self.stack.enter_context(workdir_lib.Lock(workdir))
    self.changes = workdir_lib.resumable_changes(workdir, config)
    workdir_lib.check_or_write_config(workdir, config, write=self.main)  # Says if replaced.
    mesh = sharding.make_mesh(config.catalog.shards)
    sharding.check_batch_size(config.train.batch_size, mesh)
    sharding.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
    dataset = data_lib.prepare(config.data)
    if self.main:
      workdir_lib.save_id_map(workdir, dataset)
    self.dataset, self.mesh = dataset, mesh
    self.setup = state_lib.build_run(config, dataset, mesh)
    self.events = tensorboard_lib.EventWriter(workdir, enabled=self.main)
    self.log = workdir_lib.MetricsLog(workdir, self.main, listeners=(self.events.write,))
    self.checkpoints = checkpoint_lib.Checkpoints(workdir, config.train.keep_checkpoints)
    self.partial_checkpoint = interrupt_lib.PartialCheckpoint(self.checkpoints.directory)
    self.stack.callback(self._close)
    self.test_evaluator = evaluate_lib.Evaluator(config, dataset, mesh)
    valid_config = evaluate_lib.validation_config(config)
    self.valid_evaluator = (self.test_evaluator if valid_config is config else
                            evaluate_lib.Evaluator(valid_config, dataset, mesh))

  def _close(self):
    with self.interrupts.defer():  # A second Ctrl-C does not cut a checkpoint write short.
      self.partial_checkpoint.close()
      self.checkpoints.close()
      self.events.close()

  def _restore(self) -> tuple[state_lib.TrainState, Meta]:
    """The latest state (a finished epoch, or an interrupted one if newer) and its Meta."""
    # Placed on the mesh first, so that checkpoints restore straight into the run's sharding:
    # a restored array is committed to this process's devices, and moving it onto another
    # process's devices is a cross-host transfer that the CPU and GPU backends refuse.
    state = sharding.replicate(self.setup.initial_state(), self.mesh)
    restored = self.checkpoints.restore("latest", state)
    interrupted = self.partial_checkpoint.restore(state)
    if interrupted is not None and (restored is None
                                    or interrupted[1]["epoch"] >= restored[1]["epoch"]):
      restored = interrupted
    elif interrupted is not None:  # Older than the latest epoch: left by a crash.
      self.partial_checkpoint.delete()
    steps_per_epoch, num_epochs = self.setup.steps_per_epoch, self.config.train.num_epochs
    if restored is None:
      self.log.keep_only(lambda r: False)  # Records of an earlier start that saved nothing.
      self.announce(f"starting a new run in {self.workdir}: {num_epochs} epochs of "
                 f"{steps_per_epoch} steps, validation every {self.config.train.eval_every} "
                 "epoch(s)")
      return state, Meta()
    state, meta = restored[0], Meta.from_json(restored[1])
    partial = meta.partial
    logging.info("Resuming %s from epoch %d.", self.workdir, meta.epoch)
    into = (f", {partial['position']} of {steps_per_epoch} steps into epoch {meta.epoch + 1}"
            if partial and partial["position"] < steps_per_epoch else
            f", epoch {meta.epoch + 1} trained, its validation to run" if partial else "")
    self.announce(f"resuming from epoch {meta.epoch} (step {int(state.step)}){into}; "
               f"{num_epochs} epochs in all, {self.workdir}")
    # Records logged after that checkpoint (a kill between logging and saving) are dropped.
    done = meta.epoch
    trained = meta.epoch + 1 if partial and partial.get("train_record") else done
    self.log.keep_only(lambda r: r.get("split") != "test" and (
        r.get("epoch", 0) <= done or (r.get("split") == "train" and r.get("epoch") == trained)))
    return state, meta

  # The run ---------------------------------------------------------------------------------

  def train(self, stop_after_epochs: int | None, stop_after_steps: int | None) -> dict | None:
    """Every remaining epoch, then the test; None when stopped after `stop_after_epochs`."""
    self._open()
    state, self.meta = self._restore()
    if self.changes and int(state.step):
      changed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items())
      self.announce(f"resuming with changed {changed} (recorded in metrics.jsonl)")
      self.log.write(epoch=self.meta.epoch, step=int(state.step), split="config",
                     changed=self.changes)
    self.state = sharding.replicate(state, self.mesh)
    # Wall-clock seconds of the run so far, resumes included (start-up and compilation too).
    self._wall_base, self._wall_start = float(self.meta.wall_s), time.time()
    self.clock = progress_lib.RunClock()
    self.compiled_lengths = set()
    self.steps_left = stop_after_steps
    num_epochs = self.config.train.num_epochs
    self.status = (f"interrupted before the first step; nothing new to save (last "
                   f"checkpoint: epoch {self.meta.epoch}); rerun the same command to resume")
    self.interrupts.deferred = True  # From here a signal stops at the next step boundary.
    epochs_run = 0
    while self.meta.epoch < num_epochs and not self.meta.stopped:
      if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
        return None
      self._epoch(self.meta.epoch + 1)
      epochs_run += 1
      if self.interrupts.stop_now():
        raise interrupt_lib.Interrupted(self.status)
    self.meta.partial = None
    self.status = ("interrupted while testing the best checkpoint (every epoch is saved); "
                   "rerun the same command to test it")
    self.say(f"testing the best checkpoint on {self.dataset.num_users} users")
    self.interrupts.deferred = False  # The test is redone on resume: stop it at once.
    return self._test_best()

  def wall(self) -> float:
    return round(self._wall_base + time.time() - self._wall_start, 3)

  def _validated(self, epoch: int) -> bool:
    return epoch % self.config.train.eval_every == 0 or epoch == self.config.train.num_epochs

  def _save_partial(self, position, losses, count, seconds, record=None):
    done = self.meta.epoch
    self.status = (f"interrupted again while saving epoch {done + 1}'s progress (that save may "
                   f"be incomplete; epoch {done} is saved); rerun the same command to resume")
    with self.interrupts.defer():
      partial = {"position": position, "losses": [float(v) for v in losses], "count": count,
                 "seconds": seconds, "train_record": record}
      self.partial_checkpoint.save(int(self.state.step), self.state,
                                   self.meta.to_json(partial=partial, wall_s=self.wall()))

  def _train_epoch(self, epoch: int, plans: list, partial: dict) -> dict:
    """Trains the epoch's remaining steps; its train record (also logged)."""
    setup, num_epochs = self.setup, self.config.train.num_epochs
    position = partial.get("position", 0)
    prior = np.asarray(partial.get("losses", []), dtype=np.float64)
    count = partial.get("count", 0)
    start, first_step = time.time(), int(self.state.step)
    losses, stopped_at = [], None
    bar = progress_lib.StepBar(len(plans), position, f"epoch {epoch}/{num_epochs}",
                               self.progress, notice=self.say)
    for k in range(position, len(plans)):
      if self.interrupts.stop_at_step() or self.steps_left == 0:
        stopped_at = k
        break
      plan = plans[k]
      batch = setup.batch(plan)
      count += int((plan.indices >= 0).sum())
      first = plan.length not in self.compiled_lengths
      started = bar.first_of_shape() if first else 0.0
      self.state, loss = setup.train_step(self.state, batch, setup.key, setup.schedule)
      if first:
        bar.compiled(loss, started, f"the train step (histories of length {plan.length})")
        self.compiled_lengths.add(plan.length)
      losses.append(loss)
      bar.dispatched(loss)
      if self.steps_left is not None:
        self.steps_left -= 1
      if len(losses) % 50 == 0:
        bar.set_loss(float(loss))
    bar.close()
    compile_seconds = bar.compile_seconds
    new = (_check_finite(jnp.stack(losses), first_step, epoch, self.checkpoints) if losses
           else np.zeros(0, np.float64))
    values = np.concatenate([prior, new])
    seconds = partial.get("seconds", 0.0) + time.time() - start
    if stopped_at is not None:
      self._save_partial(stopped_at, values, count, seconds)
      raise interrupt_lib.Interrupted(
          f"interrupted at epoch {epoch}/{num_epochs}, step {stopped_at} of {len(plans)}; "
          "rerun the same command to resume")
    train_seconds = max(seconds - compile_seconds, 1e-9)
    record = {"epoch": epoch, "step": int(self.state.step), "split": "train",
              "loss": float(values.mean()), "seconds": round(seconds, 3),
              "examples_per_s": round(count / train_seconds, 1), "wall_s": self.wall()}
    if compile_seconds:
      record["compile_s"] = round(compile_seconds, 3)
    self.log.write(**record)
    if not position:  # A whole epoch timed in this process.
      self.clock.train_seconds.append(train_seconds)
    return record

  def _validate(self, epoch: int, interrupted_before_saving) -> tuple[bool, str]:
    """Validates `epoch`, updates the selection state; (new best?, summary text)."""
    config, meta, metric = self.config, self.meta, self.config.train.valid_metric
    bundle = bundle_lib.Bundle(self.setup.bundle.graphdef, self.state.params)
    users = config.train.valid_users or self.dataset.num_users
    self.say(f"validating epoch {epoch} on {min(users, self.dataset.num_users)} users")
    try:
      with self.interrupts.immediate():  # Validation is redone on resume: stop it at once.
        valid, _ = self.valid_evaluator.evaluate(bundle, "valid", progress=self.progress,
                                                 max_users=config.train.valid_users)
    except interrupt_lib.Interrupted:
      interrupted_before_saving()
    self.clock.valid_seconds.append(valid["seconds"])
    self.log.write(epoch=epoch, step=int(self.state.step), split="valid", wall_s=self.wall(),
                   **valid)
    improved = selection.improved(valid, meta.best_metric, meta.best_valid, metric,
                                  config.train.selection)
    if improved:
      meta.best_epoch = epoch
      meta.best_metric = max(valid[metric], meta.best_metric)
      meta.bad_evals = 0
    else:
      meta.bad_evals += 1
    meta.best_valid = selection.best_so_far(valid, meta.best_valid)
    patience = config.train.patience
    meta.stopped = bool(patience and meta.bad_evals >= patience)
    summary = (f" | valid {metric} {valid[metric]:.4f} hit@10 {valid['hit@10']:.4f}"
               f" (best {meta.best_metric:.4f} @ {meta.best_epoch})")
    return improved, summary

  def _epoch(self, epoch: int):
    """Trains, validates (when due) and checkpoints `epoch`; prints its summary line."""
    num_epochs = self.config.train.num_epochs
    partial = self.meta.partial or {}
    self.meta.partial = None
    plans = self.setup.epoch_plan(epoch)
    record = partial.get("train_record")
    if record is None:
      record = self._train_epoch(epoch, plans, partial)
    summary = (f"epoch {epoch:3d}/{num_epochs} loss {record['loss']:.4f} "
               f"({record['examples_per_s']:.0f} ex/s)")

    def interrupted_before_saving():
      self._save_partial(len(plans), [], 0, record["seconds"], record)
      raise interrupt_lib.Interrupted(
          f"interrupted at epoch {epoch}/{num_epochs} after its last step (its training is "
          "saved; validation reruns); rerun the same command to resume")

    improved = False  # Every epoch is checkpointed, validated or not: a kill loses one at most.
    if self.interrupts.stop_now():
      interrupted_before_saving()
    if self._validated(epoch):
      improved, text = self._validate(epoch, interrupted_before_saving)
      summary += text
    self.meta.epoch = epoch
    self.meta.wall_s = self.wall()
    self.checkpoints.save(epoch, self.state, self.meta.to_json(), best=improved)
    self.partial_checkpoint.delete()
    self.status = (f"interrupted after epoch {epoch}/{num_epochs} (saved); rerun the same "
                   "command to resume")
    left = 0 if self.meta.stopped else num_epochs - epoch
    validations_left = sum(self._validated(e) for e in range(epoch + 1, num_epochs + 1)) + 1
    remaining = self.clock.remaining(left, validations_left) if left else None
    summary += f" | {progress_lib.format_duration(self.wall())} so far"
    if remaining is not None:
      summary += f", about {progress_lib.format_duration(remaining)} left"
    self.announce(summary)

  def _test_best(self) -> dict:
    """Restores the best-on-validation checkpoint and evaluates the test split once."""
    config, checkpoints = self.config, self.checkpoints
    if checkpoints.best.latest_step() is None:
      raise checkpoint_lib.CheckpointError(
          f"No validated checkpoint in {checkpoints.directory}/best; set train.eval_every so "
          "at least one validation runs.")
    state, best_meta = checkpoints.restore("best", self.state)
    best = bundle_lib.Bundle(self.setup.bundle.graphdef, state.params)
    valid = _valid_record(self.log, best_meta["best_epoch"])
    test, per_user = self.test_evaluator.evaluate(best, "test", progress=self.progress)
    self.log.write(epoch=best_meta["best_epoch"], split="test", wall_s=self.wall(), **test)
    keys = metrics.RESULT_KEYS
    results = {
        "best_epoch": best_meta["best_epoch"],
        "valid": {k: valid[k] for k in keys if k in valid},
        "test": {k: test[k] for k in keys},
        "test_all": test, "valid_all": valid,
        "epochs_run": self.meta.epoch, "variant": config.variant, "dataset": config.data.name,
        "mask_history": bool(config.train.mask_history), "sampler": config.sample.sampler,
        "sample_steps": config.sample.steps or config.model.diffusion_steps,
        "sample_seeds": config.sample.seeds, "seed": config.seed,
        "wall_s": self.wall(), "valid_users": config.train.valid_users or self.dataset.num_users,
        "valid_steps": config.train.valid_steps or config.sample.steps
                       or config.model.diffusion_steps,
    }
    if self.main:
      np.savez(f"{self.workdir}/test_ranks.npz",
               **{k: np.asarray(v) for k, v in per_user.items()})
      workdir_lib.write_json(self.workdir, "results.json", results)
    self.announce("test " + " ".join(f"{k} {v:.4f}" for k, v in results["test"].items())
               + f" (best epoch {results['best_epoch']}, history masked: "
               f"{results['mask_history']})")
    return results


def _valid_record(log, epoch: int) -> dict:
  """The validation record logged for `epoch` ({} if none)."""
  for record in reversed(log.read()):
    if record.get("split") == "valid" and record.get("epoch") == epoch:
      return record
  return {}
