"""Inference: reverse diffusion chains, DDIM, the one-step start, and seed ensembles.

All samplers return log item probabilities [B, N+1] (padding column at -inf):
  reverse   Algorithm 2: x_T ~ N(0, I), K reverse DDPM steps (respaced when K < T)
  ddim      the same kept steps with DDIM updates (eta = 0: deterministic given x_T)
  one_step  Algorithm 3's start: x_T ~ q(x_T | E[last history item]), one approximator call
With S seeds the S item distributions are averaged (log of the mean of softmaxes).

Design for speed: the history embedding is computed once per batch (it does not depend on
x_t), the chain is one `lax.scan`, seeds are a `vmap` inside the same jit (history work is
shared), and scoring against the item table happens once at the end.

Randomness is keyed per user (`chain_keys`: `fold_in(seed key, user)`), and lambda also per
reverse step and recency position, so a user's recommendations do not depend on batch size,
batch composition, length bucket or device count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffurec_jax import catalog
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.models import sasrec as sasrec_lib
from diffurec_jax import diffusion

SAMPLERS = ("reverse", "ddim", "one_step")


def sampling_schedule(config) -> diffusion.Schedule:
  """The (respaced) schedule of `config.sample.steps` kept steps (0 = all T)."""
  num_train_steps = config.model.diffusion_steps
  kept = config.sample.steps or num_train_steps
  if not 1 <= kept <= num_train_steps:
    raise ValueError(f"sample.steps={kept} must be in [1, diffusion_steps={num_train_steps}].")
  return diffusion.respace(config.model.schedule, num_train_steps, kept)


def user_normal(keys, shape):
  """One N(0, I) draw of `shape` per user key: keys [B] -> [B, *shape]."""
  return jax.vmap(lambda key: jax.random.normal(key, shape))(keys)


def chain_keys(key, seed, users):
  """The chain keys of ensemble member `seed`: users [B] int32 -> keys [B].

  fold_in(fold_in(key, seed), user), so a user's chain does not depend on its batch.
  """
  seed_key = jax.random.fold_in(key, seed)
  return jax.vmap(lambda user: jax.random.fold_in(seed_key, user))(users)


def run_chain(model, e, key_mask, history, user_keys, schedule, *, sampler, variance, eta):
  """One chain per user: e [B, L, H], user_keys [B] -> x0 [B, H]."""
  batch, length, hidden = e.shape
  num_kept = schedule.betas.shape[0]

  recency = model_lib.recency_positions(length)

  def lambdas_at(step):
    # Keyed by (user, step, recency position): independent of the padded length L.
    keys = jax.vmap(lambda key: jax.random.fold_in(key, 2 * step + 1))(user_keys)
    per_position = lambda key: user_normal(
        jax.vmap(lambda r: jax.random.fold_in(key, r))(recency), (hidden,))
    return model.lambda_mean + model.lambda_std * jax.vmap(per_position)(keys)

  def noise_at(step):
    keys = jax.vmap(lambda key: jax.random.fold_in(key, 2 * step + 2))(user_keys)
    return user_normal(keys, (hidden,))

  start = user_normal(user_keys, (hidden,))
  if sampler == "one_step":
    last_item = catalog.lookup(model.item_embedding[...], history[:, -1])
    last = jnp.full((batch,), num_kept - 1)
    x_t = diffusion.q_sample(schedule, last_item, last, start)
    return model.approximate(e, key_mask, x_t, schedule.timesteps[last], lambdas_at(num_kept))

  def step(x_t, index):
    t = jnp.full((batch,), index)
    x0_hat = model.approximate(e, key_mask, x_t, schedule.timesteps[t], lambdas_at(index))
    if sampler == "ddim":
      return diffusion.ddim_step(schedule, x0_hat, x_t, t, noise_at(index), eta), None
    return diffusion.reverse_step(schedule, x0_hat, x_t, t, noise_at(index), variance), None

  x0, _ = jax.lax.scan(step, start, jnp.arange(num_kept - 1, -1, -1))
  return x0


def ensemble_log_probs(scores):
  """scores [S, B, N+1] -> log of the mean item distribution [B, N+1]."""
  log_probs = jax.nn.log_softmax(scores, axis=-1)
  return jax.scipy.special.logsumexp(log_probs, axis=0) - jnp.log(scores.shape[0])


def diffusion_queries(bundle, history, users, key, schedule, *, sampler="reverse",
                      num_seeds=1, variance="beta", eta=0.0):
  """history [B, L], users [B] int32 -> the S chains' x0 [S, B, H]."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r}; use one of {SAMPLERS}.")
  model = bundle_lib.merge(bundle)
  e, key_mask = model.embed_history(history)

  def chain(seed):
    return run_chain(model, e, key_mask, history, chain_keys(key, seed, users), schedule,
                     sampler=sampler, variance=variance, eta=eta)

  return jax.vmap(chain)(jnp.arange(num_seeds))


def diffusion_log_probs(bundle, history, users, key, schedule, **options):
  """history [B, L], users [B] int32 -> log item probabilities [B, N+1]."""
  x0 = diffusion_queries(bundle, history, users, key, schedule, **options)
  table = model_lib.item_table(bundle)
  return ensemble_log_probs(model_lib.score(x0, table, model_lib.score_scale(bundle)))


def sasrec_queries(bundle, history, users, key, schedule=None, **unused):
  """SASRec's last hidden state [1, B, H] (deterministic: one 'chain')."""
  del users, key, schedule, unused
  return sasrec_lib.last_hidden(bundle, history)[None]


def sasrec_log_probs(bundle, history, users, key, schedule=None, **unused):
  """SASRec's distribution at the last position (deterministic)."""
  del users, key, schedule, unused
  hidden = sasrec_lib.last_hidden(bundle, history)
  return jax.nn.log_softmax(model_lib.score(hidden, model_lib.item_table(bundle)), axis=-1)


def _options(config) -> dict:
  return {"sampler": config.sample.sampler, "num_seeds": config.sample.seeds,
          "variance": config.model.reverse_variance, "eta": config.sample.eta}


def make_scorer(config):
  """A pure function (bundle, history, users, key, schedule) -> log probs [B, N+1]."""
  if config.variant == "sasrec":
    return sasrec_log_probs
  return functools.partial(diffusion_log_probs, **_options(config))


def make_queries(config):
  """A pure function (bundle, history, users, key, schedule) -> queries [S, B, H] whose
  scores against the item table (x . E^T, times the model's score_scale) give the item
  distributions; the blockwise catalog (catalog.py) ranks them without [B, N+1] logits."""
  if config.variant == "sasrec":
    return sasrec_queries
  return functools.partial(diffusion_queries, **_options(config))
