"""The diffusion noise schedule and the pure math that uses it.

A `Schedule` is built once in float64 numpy (DiffuRec's beta schedules, the DDPM posterior
coefficients, optionally respaced to K of the T training steps as in improved DDPM) and cast into
an immutable pytree. Every other function here is pure: `q_sample` noises a target embedding,
`reverse_step` and `ddim_step` take one reverse step from an x0 prediction, `training_noise` draws
the forward noise (plain or DiffuRecSys's offset noise) and `sinusoidal_embedding` encodes the step.

Shapes: B = batch, H = hidden, K = steps in the schedule. `t` is always an int32 index into the
schedule's arrays ([B]); `schedule.timesteps[t]` is the training timestep the model sees.
"""

from __future__ import annotations

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("trunc_lin", "linear", "cosine", "sqrt")
VARIANCES = ("beta", "posterior")
NOISE_MODES = ("none", "constant", "per_example", "per_element")


@flax.struct.dataclass
class Schedule:
  """Per-step diffusion constants, each an array of shape [K] (K = T unless respaced)."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  posterior_variance: jax.Array
  # int32 [K]: the training timestep (0..T-1) of each entry; the model is conditioned on these.
  timesteps: jax.Array
  num_train_steps: int = flax.struct.field(pytree_node=False)


def _betas_from_alpha_bar(alpha_bar, num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """Discretizes a continuous alpha_bar(s), s in [0, 1], into T betas (improved DDPM)."""
  steps = np.arange(num_steps, dtype=np.float64)
  ratio = alpha_bar((steps + 1) / num_steps) / alpha_bar(steps / num_steps)
  return np.minimum(1.0 - ratio, max_beta)


def beta_schedule(name: str, num_steps: int) -> np.ndarray:
  """DiffuRec's named beta schedules. Returns betas: [T] float64, each in (0, 1)."""
  if name not in SCHEDULES:
    raise ValueError(f"Unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
  if num_steps < 1:
    raise ValueError(f"The number of diffusion steps must be at least 1, got {num_steps}.")
  scale = 1000.0 / num_steps
  if name == "trunc_lin":
    betas = np.linspace(scale * 1e-4 + 0.01, scale * 0.02 + 0.01, num_steps, dtype=np.float64)
  elif name == "linear":
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  elif name == "cosine":
    betas = _betas_from_alpha_bar(
        lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2, num_steps)
  else:  # sqrt
    betas = _betas_from_alpha_bar(lambda s: 1.0 - np.sqrt(s + 1e-4), num_steps)
  if not np.all((betas > 0) & (betas < 1)):
    # The linear schedules scale with 1000 / T and pass 1 for 2 <= T <= 20.
    raise ValueError(
        f"Beta schedule {name!r} with {num_steps} steps has betas outside (0, 1) "
        f"(range {betas.min():.4g} to {betas.max():.4g}); use more steps (the linear schedules "
        f"need T = 1 or T >= 21) or another schedule.")
  return betas


def _schedule_from_betas(betas: np.ndarray, timesteps: np.ndarray, num_train_steps: int,
                         dtype) -> Schedule:
  """Derives every constant from betas [K] in float64, then casts to `dtype`."""
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  one_minus = 1.0 - alphas_cumprod
  constants = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / one_minus,
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus,
      posterior_variance=betas * (1.0 - alphas_cumprod_prev) / one_minus,
  )
  return Schedule(
      **{name: jnp.asarray(value, dtype=dtype) for name, value in constants.items()},
      timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
      num_train_steps=int(num_train_steps))


def make_schedule(name: str, num_steps: int, dtype=jnp.float32) -> Schedule:
  """The full training schedule: K = T = num_steps, timesteps = arange(T)."""
  betas = beta_schedule(name, num_steps)
  return _schedule_from_betas(betas, np.arange(num_steps), num_steps, dtype)


def kept_timesteps(num_train_steps: int, num_kept: int) -> np.ndarray:
  """K evenly spaced training timesteps of 0..T-1, always including T-1. Returns int64 [K]."""
  if not 1 <= num_kept <= num_train_steps:
    raise ValueError(
        f"Cannot keep {num_kept} of {num_train_steps} diffusion steps; "
        f"choose between 1 and {num_train_steps}.")
  if num_kept == 1:
    return np.array([num_train_steps - 1])
  return np.unique(np.round(np.linspace(0, num_train_steps - 1, num_kept)).astype(np.int64))


def respaced_betas(alphas_cumprod: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """Betas [K] (float64) of the chain on `kept` [K] that keeps alphas_cumprod [T] at those steps."""
  kept_alphas_cumprod = alphas_cumprod[kept]
  previous = np.append(1.0, kept_alphas_cumprod[:-1])
  return 1.0 - kept_alphas_cumprod / previous


def respace(schedule_name: str, num_train_steps: int, num_kept: int, dtype=jnp.float32) -> Schedule:
  """The schedule on K kept timesteps (improved DDPM respacing); K = T is the full chain."""
  betas = beta_schedule(schedule_name, num_train_steps)
  kept = kept_timesteps(num_train_steps, num_kept)
  if num_kept < num_train_steps:
    betas = respaced_betas(np.cumprod(1.0 - betas), kept)
  # For K = T the formula returns the original betas up to rounding; using them makes
  # `--steps T` bit-identical to the full chain.
  return _schedule_from_betas(betas, kept, num_train_steps, dtype)


def _per_row(values: jax.Array, t: jax.Array) -> jax.Array:
  """Gathers schedule values [K] at t [B] as a [B, 1] column that broadcasts over H."""
  return values[t][:, None]


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward process sample. x0: [B, H], t: [B] int32, noise: [B, H] -> x_t: [B, H]."""
  chex.assert_equal_shape([x0, noise])
  chex.assert_shape(t, (x0.shape[0],))
  return (_per_row(schedule.sqrt_alphas_cumprod, t) * x0
          + _per_row(schedule.sqrt_one_minus_alphas_cumprod, t) * noise)


def posterior_mean(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """Mean of q(x_{t-1} | x_t, x0) (DDPM Eq. 7). x0, x_t: [B, H], t: [B] int32 -> [B, H]."""
  chex.assert_equal_shape([x0, x_t])
  chex.assert_shape(t, (x0.shape[0],))
  return (_per_row(schedule.posterior_mean_coef1, t) * x0
          + _per_row(schedule.posterior_mean_coef2, t) * x_t)


def reverse_sigma(schedule: Schedule, t: jax.Array, variance: str) -> jax.Array:
  """Reverse-step noise scale, t: [B] int32 -> [B]; 0 at t == 0.

  'beta' is sqrt(beta_t) (DiffuRec's code); 'posterior' is sqrt(beta_tilde_t) (the paper).
  """
  if variance == "beta":
    sigma = jnp.sqrt(schedule.betas[t])
  elif variance == "posterior":
    sigma = jnp.sqrt(schedule.posterior_variance[t])
  else:
    raise ValueError(
        f"Unknown reverse variance {variance!r}; choose one of {', '.join(VARIANCES)}.")
  return jnp.where(t == 0, jnp.zeros_like(sigma), sigma)


def reverse_step(schedule: Schedule, x0_hat: jax.Array, x_t: jax.Array, t: jax.Array,
                 noise: jax.Array, variance: str) -> jax.Array:
  """One DDPM reverse step from an x0 prediction.

  x0_hat, x_t, noise: [B, H]; t: [B] int32 -> x_prev: [B, H].

  Rows with t == 0 return x0_hat exactly (the chain's output is the prediction itself).
  """
  chex.assert_equal_shape([x0_hat, x_t, noise])
  mean = posterior_mean(schedule, x0_hat, x_t, t)
  x_prev = mean + reverse_sigma(schedule, t, variance)[:, None] * noise
  return jnp.where((t == 0)[:, None], x0_hat, x_prev)


def ddim_step(schedule: Schedule, x0_hat: jax.Array, x_t: jax.Array, t: jax.Array,
              noise: jax.Array, eta: float) -> jax.Array:
  """One DDIM step (Song et al. 2021) from an x0 prediction; eta in [0, 1], 0 = deterministic.

  x0_hat, x_t, noise: [B, H], t: [B] int32 -> x_prev: [B, H]; rows with t == 0 return x0_hat.
  """
  chex.assert_equal_shape([x0_hat, x_t, noise])
  abar = _per_row(schedule.alphas_cumprod, t)
  abar_prev = _per_row(schedule.alphas_cumprod_prev, t)
  eps_hat = (x_t - jnp.sqrt(abar) * x0_hat) / jnp.sqrt(1.0 - abar)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
  # Non-negative for eta <= 1 in exact arithmetic; the clamp only absorbs rounding.
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
  x_prev = jnp.sqrt(abar_prev) * x0_hat + direction * eps_hat + sigma * noise
  return jnp.where((t == 0)[:, None], x0_hat, x_prev)


def training_noise(key: jax.Array, shape: tuple[int, ...], mode: str, delta_c: float = 1.0,
                   scale: float = 0.1) -> jax.Array:
  """Forward-process noise eps of `shape` ([B, H]) for training; inference always uses N(0, I).

  'none': N(0, I). 'constant': N(0.1 * delta_c, I) (DiffuRecSys Eq. 17). 'per_example': N(0, I) plus
  scale * s, s ~ N(0, 1) drawn once per example ([B, 1]) and shared across H (offset noise).
  'per_element': N(0, I) + scale * N(0, I), a fresh draw per element, i.e. N(0, (1 + scale^2) I)
  with no offset at all: the DiffuRecSys code's "offset noise" (randn + 0.1 * randn).
  The same key gives the same N(0, I) part in every mode.
  """
  if mode not in NOISE_MODES:
    raise ValueError(f"Unknown offset-noise mode {mode!r}; choose one of {', '.join(NOISE_MODES)}.")
  base_key, offset_key = jax.random.split(key)
  eps = jax.random.normal(base_key, shape)
  if mode == "constant":
    eps = eps + 0.1 * delta_c
  elif mode == "per_example":
    eps = eps + scale * jax.random.normal(offset_key, (*shape[:-1], 1))
  elif mode == "per_element":
    eps = eps + scale * jax.random.normal(offset_key, shape)
  return eps


def sinusoidal_embedding(t: jax.Array, dim: int, num_train_steps: int) -> jax.Array:
  """DiffuRec's step embedding input. t: [B] training timesteps -> [B, dim] float32.

  Timesteps are rescaled to 0..1000 (t * 1000 / T) so that the frequencies do not depend on T;
  the output is [cos, sin] halves with max period 1e4, zero-padded when dim is odd.
  """
  chex.assert_rank(t, 1)
  timesteps = t.astype(jnp.float32) * (1000.0 / num_train_steps)
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding
