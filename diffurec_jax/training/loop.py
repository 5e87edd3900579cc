"""Training and model selection: `train_and_evaluate(config, workdir)`.

The jitted train step (train_step.py, re-exported here), Adam with L2 weight decay and the
learning-rate schedule (optimizer.py), validation every `eval_every` epochs with early stopping on the validation metric, the best checkpoint
tested once at the end. A rerun on the same workdir resumes from the latest checkpoint; a
finished run says so and returns its results (and writes nothing).

Config values are checked before anything is read (config_check). SIGINT/SIGTERM stop at the
next step boundary and save the partial epoch (interrupt.PartialCheckpoint): the epoch plan is
a function of (seed, epoch) and each step's RNG of the step number, so (state, position,
losses so far) resume it bit-identically. Progress: a bar of finished steps per epoch, a
notice per compilation, and the run's remaining time after each epoch (progress).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffurec_jax.data import batches as batches_lib
from diffurec_jax.training import checkpoints as checkpoint_lib
from diffurec_jax import config_check
from diffurec_jax import data as data_lib
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax.training import interrupt as interrupt_lib
from diffurec_jax.lab import learning_curve
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.training.optimizer import make_optimizer
from diffurec_jax.training.state import (TrainState, init_model, make_train_step, step_options,
                                         training_setup)
from diffurec_jax.training import progress as progress_lib
from diffurec_jax import diffusion as schedule_lib
from diffurec_jax import metrics
from diffurec_jax import sharding
from diffurec_jax.training import tensorboard as tensorboard_lib
from diffurec_jax.training import workdir as workdir_lib

RESULT_KEYS = metrics.RESULT_KEYS


def _check_finite(losses, first_step: int, epoch: int, checkpoints):
  values = np.asarray(jax.device_get(losses), dtype=np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    last = checkpoints.latest.latest_step()
    where = f"epoch {last} in {checkpoints.directory}/latest" if last is not None else "none yet"
    raise FloatingPointError(
        f"The training loss is {values[bad[0]]} at step {step} (epoch {epoch}); last good "
        f"checkpoint: {where}. Lower train.learning_rate or set train.grad_clip.")
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
  main = sharding.is_main_process()
  finished = workdir_lib.read_json(workdir, "results.json")
  if finished is not None:  # A finished run is never written to (it may be read-only).
    workdir_lib.check_config(workdir, config)
    logging.info("%s is finished (results.json exists); nothing to do.", workdir)
    print(f"{workdir}: run already finished; results in {workdir}/results.json")
    return finished
  status = {"message": "interrupted before training started; nothing was trained; rerun the "
                       "same command to start"}
  with interrupt_lib.Interrupts() as interrupts, contextlib.ExitStack() as stack:
    if main:
      workdir_lib.check_writable(workdir)
      stack.enter_context(workdir_lib.Lock(workdir))
    try:
      return _train(config, workdir, main, interrupts, status, stop_after_epochs,
                    stop_after_steps, progress)
    except interrupt_lib.Interrupted as error:
      if str(error).startswith("interrupted by"):  # Straight from the signal handler.
        raise interrupt_lib.Interrupted(status["message"]) from None
      raise


def _train(config, workdir, main, interrupts, status, stop_after_epochs, stop_after_steps,
           progress):
  workdir_lib.check_or_write_config(workdir, config, write=main)  # Says if it replaced one.
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)
  sharding.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  dataset = data_lib.prepare(config.data)
  if main:
    workdir_lib.save_id_map(workdir, dataset)
  events = tensorboard_lib.EventWriter(workdir, enabled=main)
  log = workdir_lib.MetricsLog(workdir, main, listeners=(events.write,))
  say = (lambda message: tqdm.write(message)) if main else (lambda message: None)

  examples, loss_fn, next_items = training_setup(config, dataset)
  lengths = batches_lib.bucket_lengths(config.data.max_len, evaluate_lib.bucket_config(config))
  history_lengths = (examples.ends - examples.starts).astype(np.int64)
  plan_for = lambda epoch: batches_lib.epoch_plan(
      history_lengths, config.train.batch_size, lengths, config.seed, epoch,
      config.train.max_steps_per_epoch)
  steps_per_epoch = len(plan_for(1))
  num_epochs = config.train.num_epochs
  tx = make_optimizer(config.train, steps_per_epoch)
  bundle = init_model(config, dataset.num_items)
  state = TrainState(bundle.params, tx.init(bundle.params), jnp.zeros((), jnp.int32))
  checkpoints = checkpoint_lib.Checkpoints(workdir, config.train.keep_checkpoints)
  partial_checkpoint = interrupt_lib.PartialCheckpoint(checkpoints.directory)
  meta = {"epoch": 0, "best_epoch": 0, "best_metric": -math.inf, "bad_evals": 0,
          "wall_s": 0.0, "best_valid": {}}
  restored = checkpoints.restore("latest", state)
  interrupted = partial_checkpoint.restore(state)
  if interrupted is not None and (restored is None
                                  or interrupted[1]["epoch"] >= restored[1]["epoch"]):
    restored = interrupted
  elif interrupted is not None:  # Older than the latest epoch: left by a crash.
    partial_checkpoint.delete()
  if restored is not None:
    state, meta = restored
    partial = meta.get("partial")
    logging.info("Resuming %s from epoch %d.", workdir, meta["epoch"])
    into = (f", {partial['position']} of {steps_per_epoch} steps into epoch {meta['epoch'] + 1}"
            if partial and partial["position"] < steps_per_epoch else
            f", epoch {meta['epoch'] + 1} trained, its validation to run" if partial else "")
    print(f"resuming from epoch {meta['epoch']} (step {int(state.step)}){into}; "
          f"{num_epochs} epochs in all, {workdir}", flush=True)
    # Records logged after that checkpoint (a kill between logging and saving) are dropped.
    done = meta["epoch"]
    trained = meta["epoch"] + 1 if partial and partial.get("train_record") else done
    log.keep_only(lambda r: r.get("split") != "test" and (
        r.get("epoch", 0) <= done or (r.get("split") == "train" and r.get("epoch") == trained)))
  else:
    log.keep_only(lambda r: False)  # Records of an earlier start that saved no checkpoint.
    print(f"starting a new run in {workdir}: {num_epochs} epochs of {steps_per_epoch} steps, "
          f"validation every {config.train.eval_every} epoch(s)", flush=True)
  state = sharding.replicate(state, mesh)
  schedule = schedule_lib.make_schedule(config.model.schedule, config.model.diffusion_steps)
  train_step = make_train_step(loss_fn, bundle.graphdef, tx, **step_options(config))
  eval_step = evaluate_lib.make_eval_step(config)
  valid_config = evaluate_lib.validation_config(config)
  valid_step = (evaluate_lib.make_eval_step(valid_config) if valid_config is not config
                else eval_step)
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  metric = config.train.valid_metric
  validated = lambda e: e % config.train.eval_every == 0 or e == num_epochs

  # Wall-clock seconds of the run so far, resumes included (start-up and compilation too).
  wall_base, wall_start = float(meta.get("wall_s", 0.0)), time.time()
  wall = lambda: round(wall_base + time.time() - wall_start, 3)
  clock = progress_lib.RunClock()
  compiled_lengths = set()
  epochs_run = steps_run = 0
  epoch = meta["epoch"]
  stopped = meta.get("stopped", False)
  status["message"] = (f"interrupted before the first step; nothing new to save (last "
                       f"checkpoint: epoch {epoch}); rerun the same command to resume")

  def save_partial(position, losses, count, seconds, record=None):
    with interrupts.defer():
      partial = {"position": position, "losses": [float(v) for v in losses], "count": count,
                 "seconds": seconds, "train_record": record}
      partial_checkpoint.save(int(state.step), state, dict(meta, partial=partial,
                                                           wall_s=wall()))
      partial_checkpoint.close()
      checkpoints.close()
      events.close()

  interrupts.deferred = True  # From here a signal stops at the next step boundary.
  while epoch < num_epochs and not stopped:
    if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
      checkpoints.close()
      partial_checkpoint.close()
      events.close()
      return None
    epoch += 1
    partial = meta.pop("partial", None) or {}
    plans = plan_for(epoch)
    record = partial.get("train_record")
    compile_seconds = 0.0
    if record is None:
      position = partial.get("position", 0)
      prior = np.asarray(partial.get("losses", []), dtype=np.float64)
      count = partial.get("count", 0)
      start, first_step = time.time(), int(state.step)
      losses, stopped_at = [], None
      bar = progress_lib.StepBar(len(plans), position, f"epoch {epoch}/{num_epochs}",
                                 progress and main, notice=say)
      for k in range(position, len(plans)):
        if interrupts.requested or (stop_after_steps is not None
                                    and steps_run >= stop_after_steps):
          stopped_at = k
          break
        plan = plans[k]
        batch = batches_lib.build(plan, examples, dataset.items, next_items=next_items)
        count += int((plan.indices >= 0).sum())
        first = plan.length not in compiled_lengths
        started = bar.first_of_shape() if first else 0.0
        state, loss = train_step(state, sharding.shard_batch(batch, mesh), train_key, schedule)
        if first:
          bar.compiled(loss, started, f"the train step (histories of length {plan.length})")
          compiled_lengths.add(plan.length)
        losses.append(loss)
        bar.dispatched(loss)
        steps_run += 1
        if len(losses) % 50 == 0:
          bar.set_loss(float(loss))
      bar.close()
      compile_seconds = bar.compile_seconds
      new = (_check_finite(jnp.stack(losses), first_step, epoch, checkpoints) if losses
             else np.zeros(0, np.float64))
      values = np.concatenate([prior, new])
      seconds = partial.get("seconds", 0.0) + time.time() - start
      if stopped_at is not None:
        save_partial(stopped_at, values, count, seconds)
        raise interrupt_lib.Interrupted(
            f"interrupted at epoch {epoch}/{num_epochs}, step {stopped_at} of {len(plans)}; "
            "rerun the same command to resume")
      train_seconds = max(seconds - compile_seconds, 1e-9)
      record = {"epoch": epoch, "step": int(state.step), "split": "train",
                "loss": float(values.mean()), "seconds": round(seconds, 3),
                "examples_per_s": round(count / train_seconds, 1), "wall_s": wall()}
      if compile_seconds:
        record["compile_s"] = round(compile_seconds, 3)
      log.write(**record)
      if not position:  # A whole epoch timed in this process.
        clock.train_seconds.append(train_seconds)
    summary = (f"epoch {epoch:3d}/{num_epochs} loss {record['loss']:.4f} "
               f"({record['examples_per_s']:.0f} ex/s)")

    def interrupted_before_saving(record=record):
      save_partial(len(plans), [], 0, record["seconds"], record)
      raise interrupt_lib.Interrupted(
          f"interrupted at epoch {epoch}/{num_epochs} after its last step (its training is "
          "saved; validation reruns); rerun the same command to resume")

    improved = False  # Every epoch is checkpointed, validated or not: a kill loses one at most.
    if interrupts.requested:
      interrupted_before_saving()
    if validated(epoch):
      bundle = bundle_lib.Bundle(bundle.graphdef, state.params)
      users = config.train.valid_users or dataset.num_users
      say(f"validating epoch {epoch} on {min(users, dataset.num_users)} users")
      try:
        with interrupts.immediate():  # Validation is redone on resume: stop it at once.
          valid, _ = evaluate_lib.evaluate_split(bundle, dataset, "valid", valid_config, mesh,
                                                 valid_step, progress=progress and main,
                                                 max_users=config.train.valid_users)
      except interrupt_lib.Interrupted:
        interrupted_before_saving()
      clock.valid_seconds.append(valid["seconds"])
      log.write(epoch=epoch, step=int(state.step), split="valid", wall_s=wall(), **valid)
      improved = _improved(valid, meta, metric, config.train.selection)
      if improved:
        meta.update(best_epoch=epoch, best_metric=max(valid[metric], meta["best_metric"]),
                    bad_evals=0)
      else:
        meta["bad_evals"] += 1
      meta["best_valid"] = {k: max(v, meta["best_valid"].get(k, -math.inf))
                            for k, v in valid.items() if k in RESULT_KEYS}
      patience = config.train.patience
      stopped = bool(patience and meta["bad_evals"] >= patience)
      meta["stopped"] = stopped
      summary += (f" | valid {metric} {valid[metric]:.4f} hit@10 {valid['hit@10']:.4f}"
                  f" (best {meta['best_metric']:.4f} @ {meta['best_epoch']})")
    meta["epoch"] = epoch
    meta["wall_s"] = wall()
    checkpoints.save(epoch, state, meta, best=improved)
    partial_checkpoint.delete()
    status["message"] = (f"interrupted after epoch {epoch}/{num_epochs} (saved); rerun the "
                         "same command to resume")
    left = 0 if stopped else num_epochs - epoch
    remaining = clock.remaining(left, sum(validated(e) for e in range(epoch + 1, num_epochs + 1))
                                + 1) if left else None
    summary += f" | {progress_lib.format_duration(wall())} so far"
    if remaining is not None:
      summary += f", about {progress_lib.format_duration(remaining)} left"
    print(summary, flush=True)
    epochs_run += 1
    if interrupts.requested:
      checkpoints.close()
      partial_checkpoint.close()
      events.close()
      raise interrupt_lib.Interrupted(status["message"])

  meta["epoch"] = epoch
  meta.pop("partial", None)
  status["message"] = ("interrupted while testing the best checkpoint (every epoch is saved); "
                       "rerun the same command to test it")
  say(f"testing the best checkpoint on {dataset.num_users} users")
  interrupts.deferred = False  # The test is redone on resume: stop it at once.
  results = _test_best(config, workdir, bundle, state, dataset, mesh, eval_step, checkpoints,
                       meta, log, progress and main, wall)
  checkpoints.close()
  partial_checkpoint.close()
  events.close()
  if main:
    learning_curve.write_quietly(workdir)
  return results


SELECTIONS = config_check.SELECTIONS


def _improved(valid: dict, meta: dict, metric: str, selection: str) -> bool:
  """Whether this validation makes a new best checkpoint.

  metric: `metric` beats its best so far. any: some HR/NDCG/MRR@K beats its own best so far
  (the DiffuRec code's rule: it also resets the patience count).
  """
  if selection == "metric":
    return valid[metric] > meta["best_metric"]
  if selection == "any":
    best = meta.get("best_valid", {})
    return any(v > best.get(k, -math.inf) for k, v in valid.items() if k in RESULT_KEYS)
  raise ValueError(f"train.selection={selection!r}; use one of {SELECTIONS}.")


def _test_best(config, workdir, bundle, state, dataset, mesh, eval_step, checkpoints, meta,
               log, progress, wall=lambda: None):
  """Restores the best-on-validation checkpoint and evaluates the test split once."""
  if checkpoints.best.latest_step() is None:
    raise checkpoint_lib.CheckpointError(
        f"No validated checkpoint in {checkpoints.directory}/best; set train.eval_every so at "
        "least one validation runs.")
  state, best_meta = checkpoints.restore("best", state)
  best = bundle_lib.Bundle(bundle.graphdef, state.params)
  valid = _valid_record(log, best_meta["best_epoch"])
  test, per_user = evaluate_lib.evaluate_split(best, dataset, "test", config, mesh, eval_step,
                                               progress=progress)
  log.write(epoch=best_meta["best_epoch"], split="test", wall_s=wall(), **test)
  results = {
      "best_epoch": best_meta["best_epoch"],
      "valid": {k: valid[k] for k in RESULT_KEYS if k in valid},
      "test": {k: test[k] for k in RESULT_KEYS},
      "test_all": test, "valid_all": valid,
      "epochs_run": meta["epoch"], "variant": config.variant, "dataset": config.data.name,
      "mask_history": bool(config.train.mask_history), "sampler": config.sample.sampler,
      "sample_steps": config.sample.steps or config.model.diffusion_steps,
      "sample_seeds": config.sample.seeds, "seed": config.seed,
      "wall_s": wall(), "valid_users": config.train.valid_users or dataset.num_users,
      "valid_steps": config.train.valid_steps or config.sample.steps
                     or config.model.diffusion_steps,
  }
  if sharding.is_main_process():
    np.savez(f"{workdir}/test_ranks.npz", **{k: np.asarray(v) for k, v in per_user.items()})
    workdir_lib.write_json(workdir, "results.json", results)
  print("test " + " ".join(f"{k} {v:.4f}" for k, v in results["test"].items())
        + f" (best epoch {results['best_epoch']}, history masked: {results['mask_history']})")
  return results


def _valid_record(log, epoch):
  for record in reversed(log.read()):
    if record.get("split") == "valid" and record.get("epoch") == epoch:
      return record
  return {}
