"""The training step and what it needs: state, fresh parameters, the variant's loss, micro-batching.

`make_train_step` returns one jitted step (state donated, fixed shapes per length bucket,
per-step RNG by `fold_in(key, step)`). `build_run(config, dataset, mesh)` assembles everything
a run derives before its first step (examples, bucket lengths, epoch plans, optimizer, fresh
parameters, the step, the diffusion schedule, the key); training/loop.py runs the epochs
around it, and the benchmarks and tests build the same run with it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffurec_jax import catalog
from diffurec_jax import sampled_softmax as sampled_lib
from diffurec_jax import config as config_lib
from diffurec_jax import diffusion
from diffurec_jax import sharding
from diffurec_jax.data import batches as batches_lib
from diffurec_jax.data import splits
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.models import sasrec as sasrec_lib
from diffurec_jax.training import accumulate
from diffurec_jax.training import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array


def init_model(config, num_items: int) -> bundle_lib.Bundle:
  """Fresh parameters for the configured variant, seeded by config.seed."""
  if config.variant not in config_lib.VARIANTS:
    raise ValueError(f"variant={config.variant!r}; use one of {config_lib.VARIANTS}.")
  rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), 0))
  module_class = sasrec_lib.SASRec if config.variant == "sasrec" else model_lib.DiffuRec
  rows = catalog.table_rows(num_items, config.catalog.shards)
  return bundle_lib.split(module_class(num_items, config.data.max_len, config.model, rngs=rngs,
                                       table_rows=rows))


def training_setup(config, dataset):
  """(examples, loss_fn(params, graphdef, batch, rng, schedule), needs next_items)."""
  block = catalog.block_size(config.catalog.block, config.catalog.shards)
  sampled = sampled_softmax(config, dataset)
  if config.variant == "sasrec":
    loss = lambda params, graphdef, batch, rng, schedule: sasrec_lib.sequence_loss(
        params, graphdef, batch, rng, block=block, sampled=sampled)
    return batches_lib.sequence_examples(dataset), loss, True
  noise = config.offset_noise
  loss = functools.partial(model_lib.diffusion_loss,
                           noise_config=(noise.mode, noise.delta_c, noise.scale), block=block,
                           sampled=sampled)
  return splits.training_examples(dataset), loss, False


def sampled_softmax(config, dataset) -> sampled_lib.Sampled | None:
  """The sampled softmax of catalog.loss = 'sampled' (None: the full softmax)."""
  if config.catalog.loss != "sampled":
    return None
  log_q, log_p = sampled_lib.sampling_distributions(splits.training_item_counts(dataset),
                                                    config.catalog.negative_sampler)
  return sampled_lib.make(config.catalog.negatives, log_q, log_p)


def loss_weight_fn(config):
  """batch -> the denominator of the variant's weighted-mean loss (for accumulation)."""
  if config.variant == "sasrec":
    return sasrec_lib.sequence_loss_weight
  return model_lib.loss_weight


def step_options(config) -> dict:
  """make_train_step's keyword arguments for this config (micro-batching, clipping)."""
  return {"weight_fn": loss_weight_fn(config), "max_tokens": config.train.microbatch_tokens,
          "max_grad_norm": config.train.grad_clip}


def make_train_step(loss_fn, graphdef, tx, *, weight_fn=None, max_tokens: int = 0,
                    max_grad_norm: float = 0.0):
  """jit(state, batch, key, schedule) -> (state, loss); the state buffer is donated.

  With max_tokens > 0, a batch of B histories of length L with B * L > max_tokens is processed
  as k micro-batches (accumulate.py): the same update, a k-th of the activation memory. With
  max_grad_norm > 0 the gradients are clipped to that global norm before `tx` (optax's
  clip_by_global_norm, outside the optimizer state).
  """
  clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else None

  def train_step(state: TrainState, batch, key, schedule):
    rng = jax.random.fold_in(key, state.step)
    batch_size, length = batch["history"].shape
    k = accumulate.num_microbatches(batch_size, length, max_tokens if weight_fn else 0)
    loss, grads = accumulate.value_and_grad(loss_fn, weight_fn, k)(
        state.params, graphdef, batch, rng, schedule)
    if clip is not None:
      grads, _ = clip.update(grads, clip.init(state.params))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), loss

  return jax.jit(train_step, donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What a training run derives from (config, dataset, mesh) before its first step."""
  config: object
  dataset: object
  mesh: jax.sharding.Mesh
  examples: splits.Examples  # Training examples (SASRec: whole sequences).
  next_items: bool  # SASRec: every position predicts its next item.
  lengths: tuple[int, ...]  # Padded history lengths: the buckets and max_len.
  steps_per_epoch: int
  tx: optax.GradientTransformation
  bundle: bundle_lib.Bundle  # Fresh parameters (seeded by config.seed) and the graphdef.
  train_step: Callable  # jit(state, batch, key, schedule) -> (state, loss).
  schedule: object  # The training diffusion schedule.
  key: jax.Array  # Step k draws its randomness from fold_in(key, k).

  def epoch_plan(self, epoch: int) -> list:
    """The batches of `epoch` (1-based): a function of (config.seed, epoch) only."""
    history_lengths = (self.examples.ends - self.examples.starts).astype(np.int64)
    return batches_lib.epoch_plan(history_lengths, self.config.train.batch_size, self.lengths,
                                  self.config.seed, epoch,
                                  self.config.train.max_steps_per_epoch)

  def batch(self, plan) -> dict:
    """The plan's batch, built on the host and sharded over the mesh's data axis."""
    return sharding.shard_batch(batches_lib.build(plan, self.examples, self.dataset.items,
                                                  next_items=self.next_items), self.mesh)

  def initial_state(self) -> TrainState:
    """Step 0: fresh parameters and optimizer state (host arrays, not yet replicated)."""
    params = self.bundle.params
    return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32))


def build_run(config, dataset, mesh) -> RunSetup:
  """The run's examples, plans, optimizer, fresh model, jitted step, schedule and key."""
  sharding.check_batch_size(config.train.batch_size, mesh)
  examples, loss_fn, next_items = training_setup(config, dataset)
  lengths = batches_lib.padded_lengths(config)
  history_lengths = (examples.ends - examples.starts).astype(np.int64)
  steps_per_epoch = len(batches_lib.epoch_plan(
      history_lengths, config.train.batch_size, lengths, config.seed, 1,
      config.train.max_steps_per_epoch))
  tx = optimizer_lib.make_optimizer(config.train, steps_per_epoch)
  bundle = init_model(config, dataset.num_items)
  return RunSetup(
      config=config, dataset=dataset, mesh=mesh, examples=examples, next_items=next_items,
      lengths=tuple(lengths), steps_per_epoch=steps_per_epoch, tx=tx, bundle=bundle,
      train_step=sharding.under_mesh(
          make_train_step(loss_fn, bundle.graphdef, tx, **step_options(config)), mesh),
      schedule=diffusion.make_schedule(config.model.schedule, config.model.diffusion_steps),
      key=jax.random.fold_in(jax.random.key(config.seed), 1))
