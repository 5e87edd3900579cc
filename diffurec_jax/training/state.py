"""The training step and what it needs: state, fresh parameters, the variant's loss, micro-batching.

`make_train_step` returns one jitted step (state donated, fixed shapes per length bucket,
per-step RNG by `fold_in(key, step)`); train.py runs the epochs around it.
"""

from __future__ import annotations

import functools

import flax
import jax
import optax
from flax import nnx

from diffurec_jax.training import accumulate
from diffurec_jax.data import batches as batches_lib
from diffurec_jax import config as config_lib
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.models import sasrec as sasrec_lib
from diffurec_jax.data import splits


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
  return bundle_lib.split(module_class(num_items, config.data.max_len, config.model, rngs=rngs))


def training_setup(config, dataset):
  """(examples, loss_fn(params, graphdef, batch, rng, schedule), needs next_items)."""
  if config.variant == "sasrec":
    loss = lambda params, graphdef, batch, rng, schedule: sasrec_lib.sequence_loss(
        params, graphdef, batch, rng)
    return batches_lib.sequence_examples(dataset), loss, True
  noise = config.offset_noise
  loss = functools.partial(model_lib.diffusion_loss,
                           noise_config=(noise.mode, noise.delta_c, noise.scale))
  return splits.training_examples(dataset), loss, False


def loss_weight_fn(config):
  """batch -> the denominator of the variant's weighted-mean loss (for accumulation)."""
  if config.variant == "sasrec":
    return sasrec_lib.sequence_loss_weight
  return model_lib.loss_weight


def step_options(config) -> dict:
  """make_train_step's keyword arguments for this config (micro-batching)."""
  return {"weight_fn": loss_weight_fn(config), "max_tokens": config.train.microbatch_tokens}


def make_train_step(loss_fn, graphdef, tx, *, weight_fn=None, max_tokens: int = 0):
  """jit(state, batch, key, schedule) -> (state, loss); the state buffer is donated.

  With max_tokens > 0, a batch of B histories of length L with B * L > max_tokens is processed
  as k micro-batches (accumulate.py): the same update, a k-th of the activation memory.
  """

  def train_step(state: TrainState, batch, key, schedule):
    rng = jax.random.fold_in(key, state.step)
    batch_size, length = batch["history"].shape
    k = accumulate.num_microbatches(batch_size, length, max_tokens if weight_fn else 0)
    loss, grads = accumulate.value_and_grad(loss_fn, weight_fn, k)(
        state.params, graphdef, batch, rng, schedule)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), loss

  return jax.jit(train_step, donate_argnums=0)
