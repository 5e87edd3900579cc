"""Tests of the diffusion schedule against values computed independently here (float64, loops)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax import diffusion as sch

STEPS = (1, 4, 32, 1000)
# The linear schedules scale their betas with 1000 / T, so 2 <= T <= 20 puts betas above 1.
INVALID = {("trunc_lin", 4), ("linear", 4)}
VALID = [(name, steps) for name in sch.SCHEDULES for steps in STEPS if (name, steps) not in INVALID]
FIELDS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
          "posterior_variance")


def reference_betas(name, steps):
  """The beta schedules written again, one beta at a time."""
  if name in ("trunc_lin", "linear"):
    offset = 0.01 if name == "trunc_lin" else 0.0
    first, last = 0.1 / steps + offset, 20.0 / steps + offset
    if steps == 1:
      return np.array([first])
    return np.array([first + (last - first) * i / (steps - 1) for i in range(steps)])
  if name == "cosine":
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  else:
    alpha_bar = lambda s: 1 - math.sqrt(s + 1e-4)
  return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                   for i in range(steps)])


def reference_constants(betas):
  """DDPM's constants from betas, accumulated step by step."""
  out = {field: [] for field in FIELDS}
  alpha_bar_prev = 1.0
  for beta in betas:
    alpha = 1 - beta
    alpha_bar = alpha_bar_prev * alpha
    out["betas"].append(beta)
    out["alphas_cumprod"].append(alpha_bar)
    out["alphas_cumprod_prev"].append(alpha_bar_prev)
    out["sqrt_alphas_cumprod"].append(math.sqrt(alpha_bar))
    out["sqrt_one_minus_alphas_cumprod"].append(math.sqrt(1 - alpha_bar))
    # DDPM Eq. 7: mu = sqrt(abar') beta / (1 - abar) x0 + sqrt(alpha) (1 - abar') / (1 - abar) x_t.
    out["posterior_mean_coef1"].append(math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar))
    out["posterior_mean_coef2"].append(math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar))
    out["posterior_variance"].append((1 - alpha_bar_prev) / (1 - alpha_bar) * beta)
    alpha_bar_prev = alpha_bar
  return {field: np.array(values) for field, values in out.items()}


def random_normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("name,steps", VALID)
def test_beta_schedule_matches_reference_in_float64(name, steps):
  betas = sch.beta_schedule(name, steps)
  assert betas.dtype == np.float64
  np.testing.assert_allclose(betas, reference_betas(name, steps), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,steps,first,last", [
    ("trunc_lin", 32, 0.013125, 0.635),
    ("trunc_lin", 1000, 0.0101, 0.03),
    ("trunc_lin", 1, 0.11, 0.11),
    ("linear", 1000, 1e-4, 0.02),
    ("linear", 32, 0.003125, 0.625),
    ("linear", 1, 0.1, 0.1),
    ("cosine", 1, 0.999, 0.999),
    ("sqrt", 1, 0.999, 0.999),
    ("sqrt", 32, None, 0.999),
])
def test_beta_schedule_endpoints(name, steps, first, last):
  betas = sch.beta_schedule(name, steps)
  if first is not None:
    assert betas[0] == pytest.approx(first, rel=1e-12)
  assert betas[-1] == pytest.approx(last, rel=1e-12)


@pytest.mark.parametrize("name,steps", VALID)
def test_make_schedule_matches_reference(name, steps):
  schedule = sch.make_schedule(name, steps)
  expected = reference_constants(reference_betas(name, steps))
  for field in FIELDS:
    value = getattr(schedule, field)
    chex.assert_shape(value, (steps,))
    chex.assert_type(value, jnp.float32)
    np.testing.assert_allclose(value, expected[field], rtol=1e-6, atol=1e-30, err_msg=field)
  np.testing.assert_array_equal(schedule.timesteps, np.arange(steps))
  chex.assert_type(schedule.timesteps, jnp.int32)
  assert schedule.num_train_steps == steps
  # Nine array leaves; num_train_steps is static metadata.
  assert len(jax.tree_util.tree_leaves(schedule)) == 9


@pytest.mark.parametrize("name,steps,match", [
    ("quadratic", 32, "Unknown beta schedule"),
    ("trunc_lin", 0, "at least 1"),
    ("trunc_lin", 4, "outside"),
    ("linear", 20, "outside"),
])
def test_bad_schedules_are_rejected(name, steps, match):
  with pytest.raises(ValueError, match=match):
    sch.make_schedule(name, steps)


@pytest.mark.parametrize("name,steps", VALID)
def test_respace_all_steps_is_the_full_schedule(name, steps):
  full = sch.make_schedule(name, steps)
  respaced = sch.respace(name, steps, steps)
  for field in FIELDS + ("timesteps",):
    np.testing.assert_array_equal(getattr(respaced, field), getattr(full, field), err_msg=field)
  assert respaced.num_train_steps == steps
  # The respacing formula itself returns the original betas in float64.
  betas = sch.beta_schedule(name, steps)
  np.testing.assert_allclose(
      sch.respaced_betas(np.cumprod(1 - betas), np.arange(steps)), betas, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("steps,kept,expected", [
    (32, 1, [31]),
    (32, 2, [0, 31]),
    (32, 4, [0, 10, 21, 31]),
    (32, 31, None),
    (1000, 8, [0, 143, 285, 428, 571, 714, 856, 999]),
    (4, 3, [0, 2, 3]),  # linspace gives 1.5 -> 2 (round half to even)
])
def test_respace_fewer_steps(steps, kept, expected):
  name = "trunc_lin" if steps > 20 else "cosine"
  full = reference_constants(reference_betas(name, steps))
  respaced = sch.respace(name, steps, kept)
  timesteps = np.asarray(respaced.timesteps)
  if expected is not None:
    np.testing.assert_array_equal(timesteps, expected)
  assert len(set(timesteps.tolist())) == kept and timesteps[-1] == steps - 1
  assert np.all(np.diff(timesteps) > 0)
  for field in FIELDS:
    chex.assert_shape(getattr(respaced, field), (kept,))
  np.testing.assert_allclose(respaced.alphas_cumprod, full["alphas_cumprod"][timesteps], rtol=1e-6)
  # A valid DDPM chain on its own: constants derived from its betas.
  expected_constants = reference_constants(np.asarray(respaced.betas, np.float64))
  np.testing.assert_allclose(respaced.posterior_variance, expected_constants["posterior_variance"],
                             rtol=1e-5)
  assert respaced.num_train_steps == steps


@pytest.mark.parametrize("kept", [0, 33])
def test_respace_rejects_bad_step_counts(kept):
  with pytest.raises(ValueError, match="Cannot keep"):
    sch.respace("trunc_lin", 32, kept)


def test_q_sample_moments():
  schedule = sch.make_schedule("trunc_lin", 32)
  num_samples, t = 100_000, 10
  x0 = jnp.tile(jnp.array([[1.5, -2.0]]), (num_samples, 1))
  noise = random_normal(0, x0.shape)
  x_t = sch.q_sample(schedule, x0, jnp.full((num_samples,), t, jnp.int32), noise)
  chex.assert_shape(x_t, (num_samples, 2))
  alpha_bar = reference_constants(reference_betas("trunc_lin", 32))["alphas_cumprod"][t]
  np.testing.assert_allclose(x_t.mean(0), math.sqrt(alpha_bar) * np.array([1.5, -2.0]), atol=1e-2)
  np.testing.assert_allclose(x_t.var(0), [1 - alpha_bar] * 2, atol=1e-2)


def test_posterior_mean_closed_form():
  schedule = sch.make_schedule("cosine", 32)
  ref = reference_constants(reference_betas("cosine", 32))
  x0, x_t = random_normal(0, (5, 3)), random_normal(1, (5, 3))
  t = np.array([0, 1, 7, 30, 31])
  alpha_bar, alpha_bar_prev = ref["alphas_cumprod"][t, None], ref["alphas_cumprod_prev"][t, None]
  beta = ref["betas"][t, None]
  x0_64, x_t_64 = np.asarray(x0, np.float64), np.asarray(x_t, np.float64)
  expected = (np.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar) * x0_64
              + np.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t_64)
  mean = sch.posterior_mean(schedule, x0, x_t, jnp.asarray(t, jnp.int32))
  chex.assert_shape(mean, (5, 3))
  np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variance,field", [("beta", "betas"), ("posterior", "posterior_variance")])
def test_reverse_step_variance(variance, field):
  schedule = sch.make_schedule("trunc_lin", 32)
  expected_sigma = np.sqrt(reference_constants(reference_betas("trunc_lin", 32))[field])
  t = jnp.array([0, 1, 15, 31], jnp.int32)
  sigma = sch.reverse_sigma(schedule, t, variance)
  chex.assert_shape(sigma, (4,))
  np.testing.assert_allclose(sigma, [0.0, *expected_sigma[[1, 15, 31]]], rtol=1e-6)

  x0_hat, x_t, noise = random_normal(0, (4, 3)), random_normal(1, (4, 3)), random_normal(2, (4, 3))
  x_prev = sch.reverse_step(schedule, x0_hat, x_t, t, noise, variance)
  chex.assert_shape(x_prev, (4, 3))
  np.testing.assert_array_equal(x_prev[0], x0_hat[0])
  mean = sch.posterior_mean(schedule, x0_hat, x_t, t)
  np.testing.assert_allclose(x_prev[1:], (mean + sigma[:, None] * noise)[1:], rtol=1e-6, atol=1e-6)

  # Sample variance over 1e5 draws at t = 15.
  num_samples = 100_000
  t = jnp.full((num_samples,), 15, jnp.int32)
  zeros = jnp.zeros((num_samples, 1))
  draws = sch.reverse_step(schedule, zeros + 0.5, zeros - 1.0, t,
                           random_normal(3, (num_samples, 1)), variance)
  assert float(draws.var()) == pytest.approx(expected_sigma[15] ** 2, rel=2e-2)


def test_reverse_sigma_rejects_unknown_variance():
  with pytest.raises(ValueError, match="beta, posterior"):
    sch.reverse_sigma(sch.make_schedule("trunc_lin", 32), jnp.zeros((1,), jnp.int32), "fixed")


# Shared compiled steps; every DDIM test below uses [8, 4] inputs so they compile once.
ddim_step = jax.jit(sch.ddim_step)
q_sample = jax.jit(sch.q_sample)


@pytest.mark.parametrize("kept", [32, 8, 1])
def test_ddim_deterministic_and_consistent(kept):
  schedule = sch.respace("trunc_lin", 32, kept)
  x0, eps = random_normal(0, (8, 4)), random_normal(1, (8, 4))
  t = jnp.asarray(np.round(np.linspace(0, kept - 1, 8)), jnp.int32)  # first and last step included
  x_t = q_sample(schedule, x0, t, eps)
  first = ddim_step(schedule, x0, x_t, t, random_normal(2, (8, 4)), 0.0)
  second = ddim_step(schedule, x0, x_t, t, random_normal(3, (8, 4)), 0.0)
  chex.assert_shape(first, (8, 4))
  np.testing.assert_array_equal(first, second)
  at_zero = np.asarray(t) == 0
  np.testing.assert_array_equal(first[at_zero], x0[at_zero])
  # With the true x0, an eta = 0 step lands on q_sample one kept step earlier, with the same eps.
  expected = q_sample(schedule, x0, jnp.maximum(t - 1, 0), eps)
  np.testing.assert_allclose(first[~at_zero], expected[~at_zero], rtol=1e-5, atol=1e-5)


def test_ddim_eta_one_is_the_ddpm_posterior_step():
  schedule = sch.respace("cosine", 1000, 8)
  t = jnp.arange(8, dtype=jnp.int32)
  x0_hat, x_t, noise = random_normal(0, (8, 4)), random_normal(1, (8, 4)), random_normal(2, (8, 4))
  np.testing.assert_allclose(
      ddim_step(schedule, x0_hat, x_t, t, noise, 1.0),
      sch.reverse_step(schedule, x0_hat, x_t, t, noise, "posterior"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [0.1, 0.5])
def test_training_noise_modes(scale):
  key, shape = jax.random.key(7), (1000, 100)
  plain = sch.training_noise(key, shape, "none")
  constant = sch.training_noise(key, shape, "constant", delta_c=2.0)
  per_example = sch.training_noise(key, shape, "per_example", scale=scale)
  for eps in (plain, constant, per_example):
    chex.assert_shape(eps, shape)
  assert abs(float(plain.mean())) < 1e-2
  assert float(plain.var()) == pytest.approx(1.0, abs=2e-2)
  assert float(constant.mean()) == pytest.approx(0.2, abs=1e-2)
  np.testing.assert_allclose(constant - plain, 0.2, atol=1e-6)
  # Offset noise: one shift per row, shared across H, so row means vary by scale^2 + 1/H.
  offset = per_example - plain
  np.testing.assert_allclose(offset, offset[:, :1] * jnp.ones((1, 100)), atol=1e-6)
  assert abs(float(per_example.mean())) < 5 * math.sqrt(1e-5 + scale**2 / 1000)
  assert float(per_example.mean(1).var()) == pytest.approx(scale**2 + 1 / 100, rel=0.15)
  assert float(plain.mean(1).var()) == pytest.approx(1 / 100, rel=0.15)


def test_training_noise_rejects_unknown_mode():
  with pytest.raises(ValueError, match="none, constant, per_example"):
    sch.training_noise(jax.random.key(0), (2, 3), "offset")


@pytest.mark.parametrize("dim", [8, 7, 1])
def test_sinusoidal_embedding_at_zero(dim):
  embedding = sch.sinusoidal_embedding(jnp.array([0, 5, 31]), dim, 32)
  chex.assert_shape(embedding, (3, dim))
  half = dim // 2
  np.testing.assert_array_equal(embedding[0], [1.0] * half + [0.0] * (dim - half))
  if dim % 2:
    np.testing.assert_array_equal(embedding[:, -1], 0.0)


def test_sinusoidal_embedding_values():
  # t = 16 of T = 32 is timestep 500; dim 4 has frequencies 1 and 1e4^(-1/2) = 0.01.
  embedding = sch.sinusoidal_embedding(jnp.array([16]), 4, 32)
  np.testing.assert_allclose(
      embedding[0], [math.cos(500), math.cos(5), math.sin(500), math.sin(5)], atol=1e-4)


@pytest.mark.slow
def test_jit_agrees_with_eager():
  schedule = sch.respace("trunc_lin", 32, 8)
  x0, x_t, noise = random_normal(0, (8, 4)), random_normal(1, (8, 4)), random_normal(2, (8, 4))
  t = jnp.arange(8, dtype=jnp.int32)
  calls = [
      (sch.q_sample, (schedule, x0, t, noise), {}),
      (sch.posterior_mean, (schedule, x0, x_t, t), {}),
      (sch.reverse_step, (schedule, x0, x_t, t, noise), {"variance": "posterior"}),
      (sch.ddim_step, (schedule, x0, x_t, t, noise), {"eta": 0.5}),
      (sch.sinusoidal_embedding, (schedule.timesteps,), {"dim": 6, "num_train_steps": 32}),
      (sch.training_noise, (jax.random.key(3), (8, 4)), {"mode": "per_example"}),
  ]
  for function, args, kwargs in calls:
    static = ("shape",) if function is sch.training_noise else ()
    jitted = jax.jit(function, static_argnames=static + tuple(kwargs))
    np.testing.assert_allclose(jitted(*args, **kwargs), function(*args, **kwargs),
                               rtol=1e-6, atol=1e-6, err_msg=function.__name__)
