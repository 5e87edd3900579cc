"""The optimiser: Adam with L2 weight decay (as torch Adam) and the learning-rate schedule.

Both are optax objects of the step number; epochs are converted with `steps_per_epoch`.
"""

from __future__ import annotations

import optax

# step: torch StepLR (constant without decay epochs). cosine: to 0 at num_epochs.
LR_SCHEDULES = ("step", "cosine")


def learning_rate_schedule(train_config, steps_per_epoch: int):
  """step -> learning rate: linear warm-up, then a step decay by epoch or a cosine to 0.

  step:   lr * lr_decay_rate ** floor(epoch / lr_decay_epochs) (torch StepLR; constant if 0)
  cosine: lr * (1 + cos(pi * progress)) / 2 over the steps after warm-up, to num_epochs.
  """
  if train_config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"train.lr_schedule={train_config.lr_schedule!r}; use one of "
                     f"{LR_SCHEDULES}.")
  peak = train_config.learning_rate
  warmup = int(round(train_config.warmup_epochs * steps_per_epoch))
  if train_config.lr_schedule == "cosine":
    total = max(train_config.num_epochs * steps_per_epoch - warmup, 1)
    after = optax.cosine_decay_schedule(peak, total)
  elif train_config.lr_decay_epochs:
    after = optax.exponential_decay(
        peak, transition_steps=train_config.lr_decay_epochs * steps_per_epoch,
        decay_rate=train_config.lr_decay_rate, staircase=True)
  else:
    after = optax.constant_schedule(peak)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(train_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam + L2 weight decay added to the gradient (as torch Adam), scheduled learning rate.

  Gradient clipping (train.grad_clip) happens in the train step, before this: it holds no
  state, so a run may resume with another clip (or none) from any checkpoint.
  """
  learning_rate = learning_rate_schedule(train_config, steps_per_epoch)
  parts = []
  if train_config.weight_decay:
    parts.append(optax.add_decayed_weights(train_config.weight_decay))
  parts += [optax.scale_by_adam(), optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*parts)
