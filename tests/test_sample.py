"""Tests of the samplers: distributions, determinism, per-seed and per-user noise, the ensemble,
DDIM, respacing, and the scan-based chain against a plain Python loop written here.

One tiny DiffuRec (B = 4, L = 8, H = 16, 20 items, 2 blocks, T = 32) and one jitted
`diffusion_log_probs` shared by every test, so each sampler configuration compiles once.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax import config as config_lib
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax import samplers as sample
from diffurec_jax import diffusion as schedule_lib
from diffurec_jax.training import state as train_state
from tiny_model import HIDDEN, HISTORY, MAX_LEN, NUM_ITEMS

USERS = jnp.array([3, 11, 5, 0], jnp.int32)
KEY = jax.random.key(7)

LOG_PROBS = jax.jit(sample.diffusion_log_probs,
                    static_argnames=("sampler", "num_seeds", "variance", "eta"))


def log_probs(bundle, history, users, key, schedule, *, sampler="reverse", num_seeds=1,
              variance="beta", eta=0.0):
  """LOG_PROBS with every option spelled out, so that equal options hit one compilation."""
  return LOG_PROBS(bundle, history, users, key, schedule, sampler=sampler, num_seeds=num_seeds,
                   variance=variance, eta=eta)


def small_config(presets="diffurec"):
  config = config_lib.base_config()
  config_lib.apply_presets(config, presets)
  config.data.max_len = MAX_LEN
  # N(0, 1) item rows (the papers' init): an untrained model whose chains visibly depend on
  # their noise, which the seed and key tests below need (with 0.02 rows they differ by ~1e-4).
  config.model.update(dict(hidden=HIDDEN, num_blocks=2, num_heads=2, item_init_std=1.0))
  return config


@pytest.fixture(scope="module")
def config():
  return small_config()


@pytest.fixture(scope="module")
def bundle(config):
  return train_state.init_model(config, NUM_ITEMS)


@pytest.fixture(scope="module")
def schedule(config):
  return sample.sampling_schedule(config)


def max_abs_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


# The reference: one reverse chain per user as a Python loop.

@jax.jit
def x0_prediction(bundle, history, x_t, t, lambdas):
  """f_theta with explicit lambdas [B, L, H]; no randomness inside."""
  model = bundle_lib.merge(bundle)
  e, key_mask = model.embed_history(history)
  return model.approximate(e, key_mask, x_t, t, lambdas)


def naive_log_probs(bundle, history, users, key, schedule, seed, sampler, variance="beta",
                    eta=0.0):
  """Seed `seed`'s chain, its noise keyed as sample.py documents: per user,
  fold_in(fold_in(key, seed), user); x_T from the user key itself, the lambda at recency
  position r of kept step k from fold_in(fold_in(user key, 2k + 1), r), and the reverse noise
  from fold_in(user key, 2k + 2)."""
  model = bundle_lib.merge(bundle)
  batch, length = history.shape
  user_keys = [jax.random.fold_in(jax.random.fold_in(key, seed), int(user)) for user in users]
  x = jnp.stack([jax.random.normal(user_key, (HIDDEN,)) for user_key in user_keys])
  for index in reversed(range(schedule.betas.shape[0])):
    # One [H] draw per recency position r (r = 0 is the last column): independent of L.
    lambdas = jnp.stack([
        jnp.stack([model.lambda_mean + model.lambda_std * jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(user_key, 2 * index + 1), length - 1 - column),
            (HIDDEN,)) for column in range(length)])
        for user_key in user_keys])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(user_key, 2 * index + 2), (HIDDEN,))
                       for user_key in user_keys])
    t = jnp.full((batch,), index)
    x0_hat = x0_prediction(bundle, history, x, schedule.timesteps[t], lambdas)
    if sampler == "ddim":
      x = schedule_lib.ddim_step(schedule, x0_hat, x, t, noise, eta)
    else:
      x = schedule_lib.reverse_step(schedule, x0_hat, x, t, noise, variance)
  return jax.nn.log_softmax(model_lib.score(x, model_lib.item_table(bundle)), axis=-1)


@pytest.fixture(scope="module")
def naive(bundle, schedule):
  return functools.cache(lambda seed, sampler: naive_log_probs(
      bundle, HISTORY, USERS, KEY, schedule, seed, sampler))


# Distributions.

@pytest.mark.parametrize("sampler,num_seeds", [
    ("reverse", 1), ("reverse", 3), ("ddim", 1), ("one_step", 3)])
@pytest.mark.slow
def test_log_probs_are_distributions_over_items(bundle, schedule, sampler, num_seeds):
  result = log_probs(bundle, HISTORY, USERS, KEY, schedule, sampler=sampler,
                     num_seeds=num_seeds)
  chex.assert_shape(result, (4, NUM_ITEMS + 1))
  assert np.all(np.isneginf(np.asarray(result[:, 0])))
  chex.assert_tree_all_finite(result[:, 1:])
  chex.assert_trees_all_close(jax.scipy.special.logsumexp(result, axis=-1), jnp.zeros(4),
                              atol=1e-5)


def test_unknown_sampler_is_rejected(bundle, schedule):
  with pytest.raises(ValueError, match="sampler"):
    sample.diffusion_log_probs(bundle, HISTORY, USERS, KEY, schedule, sampler="ddpm")


# Determinism and seeds.

def test_same_key_same_result_other_key_another(bundle, schedule):
  first = log_probs(bundle, HISTORY, USERS, KEY, schedule)
  again = log_probs(bundle, HISTORY, USERS, jax.random.key(7), schedule)
  other = log_probs(bundle, HISTORY, USERS, jax.random.key(8), schedule)
  chex.assert_trees_all_equal(first, again)
  assert max_abs_diff(first[:, 1:], other[:, 1:]) > 1e-3


@pytest.mark.parametrize("sampler", ["reverse", "ddim"])
@pytest.mark.slow
def test_scan_chain_equals_a_python_loop(bundle, schedule, naive, sampler):
  scanned = log_probs(bundle, HISTORY, USERS, KEY, schedule, sampler=sampler)
  chex.assert_trees_all_close(scanned, naive(0, sampler), atol=1e-5)


@pytest.mark.slow
def test_seeds_differ(naive):
  members = [naive(seed, "reverse") for seed in range(3)]
  for first in range(3):
    for second in range(first + 1, 3):
      assert max_abs_diff(members[first][:, 1:], members[second][:, 1:]) > 1e-3, (first, second)


@pytest.mark.slow
def test_ensemble_is_the_mean_of_the_seed_distributions(bundle, schedule, naive):
  ensemble = log_probs(bundle, HISTORY, USERS, KEY, schedule, num_seeds=3)
  members = np.stack([np.exp(np.asarray(naive(seed, "reverse"))) for seed in range(3)])
  np.testing.assert_allclose(np.exp(np.asarray(ensemble)), members.mean(axis=0), atol=1e-6)
  # Not merely the first member.
  assert max_abs_diff(ensemble[:, 1:], naive(0, "reverse")[:, 1:]) > 1e-3


@pytest.mark.parametrize("scores", [
    [[[-np.inf, 0.0, 0.0, 0.0]], [[-np.inf, 10.0, 0.0, 0.0]]],
    [[[-np.inf, 1.0, 2.0], [-np.inf, 3.0, -3.0]],
     [[-np.inf, 2.0, 1.0], [-np.inf, 0.0, 0.0]],
     [[-np.inf, -5.0, 5.0], [-np.inf, 1.0, 1.0]]],
    [[[-np.inf, 100.0, -100.0]]],  # One seed: plain log-softmax, even when saturated.
])
def test_ensemble_log_probs_is_the_log_of_the_mean_softmax(scores):
  scores = np.asarray(scores, np.float64)
  shifted = np.exp(scores - scores[..., 1:].max(axis=-1, keepdims=True))
  with np.errstate(divide="ignore"):  # The padding column: log 0 = -inf.
    expected = np.log((shifted / shifted.sum(axis=-1, keepdims=True)).mean(axis=0))
  result = sample.ensemble_log_probs(jnp.asarray(scores, jnp.float32))
  chex.assert_shape(result, scores.shape[1:])
  np.testing.assert_allclose(np.asarray(result), expected, atol=1e-5)


def test_noise_is_keyed_per_user_not_per_batch_row(bundle, schedule):
  # With the default lambda_std the lambdas, x_T and the reverse noise of a row depend only on
  # (key, seed, user, step, L): reordering the batch and changing the neighbours changes nothing.
  assert bundle_lib.merge(bundle).lambda_std > 0
  others = jnp.array([[0, 0, 0, 0, 0, 0, 0, 2], [0, 0, 0, 14, 15, 16, 17, 18]], jnp.int32)
  history = jnp.stack([HISTORY[2], HISTORY[0], HISTORY[0], others[1]])
  users = jnp.array([USERS[2], 17, USERS[0], 4], jnp.int32)
  original = log_probs(bundle, HISTORY, USERS, KEY, schedule)
  regrouped = log_probs(bundle, history, users, KEY, schedule)
  chex.assert_trees_all_close(regrouped[0], original[2], atol=1e-6)
  chex.assert_trees_all_close(regrouped[2], original[0], atol=1e-6)
  # The same history under another user id draws other noise.
  assert max_abs_diff(regrouped[1, 1:], original[0, 1:]) > 1e-3


# DDIM.

def test_ddim_without_eta_is_deterministic_and_differs_from_ddpm(bundle, schedule):
  ddim = log_probs(bundle, HISTORY, USERS, KEY, schedule, sampler="ddim", eta=0.0)
  again = log_probs(bundle, HISTORY, USERS, KEY, schedule, sampler="ddim", eta=0.0)
  reverse = log_probs(bundle, HISTORY, USERS, KEY, schedule, sampler="reverse")
  chex.assert_trees_all_equal(ddim, again)
  assert max_abs_diff(ddim[:, 1:], reverse[:, 1:]) > 1e-3


@pytest.mark.parametrize("eta,noise_matters", [(0.0, False), (1.0, True)])
def test_ddim_step_uses_the_noise_only_with_eta(schedule, eta, noise_matters):
  x0_hat, x_t, noise, other_noise = jnp.asarray(
      np.random.default_rng(0).standard_normal((4, 3, HIDDEN)), jnp.float32)
  t = jnp.array([0, 5, 31])
  first = schedule_lib.ddim_step(schedule, x0_hat, x_t, t, noise, eta)
  second = schedule_lib.ddim_step(schedule, x0_hat, x_t, t, other_noise, eta)
  chex.assert_trees_all_equal(first[0], x0_hat[0])  # t == 0 returns the prediction.
  chex.assert_trees_all_equal(first[0], second[0])
  if noise_matters:
    assert max_abs_diff(first[1:], second[1:]) > 1e-3
  else:
    chex.assert_trees_all_equal(first, second)


# Respacing.

def test_respacing_to_all_steps_is_the_full_chain(config, bundle, schedule):
  full = small_config()
  full.sample.steps = full.model.diffusion_steps
  respaced = sample.sampling_schedule(full)
  training = schedule_lib.make_schedule(config.model.schedule, config.model.diffusion_steps)
  chex.assert_trees_all_equal(respaced, schedule)
  chex.assert_trees_all_equal(respaced, training)
  chex.assert_trees_all_equal(log_probs(bundle, HISTORY, USERS, KEY, respaced),
                              log_probs(bundle, HISTORY, USERS, KEY, schedule))


# Offset noise is training-only.

def test_sampler_ignores_offset_noise(bundle):
  configs = [small_config(), small_config()]
  configs[1].offset_noise.update(dict(mode="constant", delta_c=50.0))
  outputs = []
  for config in configs:
    config.sample.update(dict(sampler="one_step", seeds=3))
    model = train_state.init_model(config, NUM_ITEMS)
    chex.assert_trees_all_equal(model.params, bundle.params)
    scorer = sample.make_scorer(config)
    # The scorer is diffusion_log_probs with the config's sampling options bound; calling the
    # shared jitted function with those options reuses its compilation.
    assert isinstance(scorer, functools.partial) and scorer.func is sample.diffusion_log_probs
    outputs.append(LOG_PROBS(model, HISTORY, USERS, KEY, sample.sampling_schedule(config),
                             **scorer.keywords))
  chex.assert_trees_all_equal(*outputs)
