"""How the noised target x_t enters the history (DiffuRec Eq. 15, DiffuRecSys Eq. 16).

`lambda` is drawn per element, shape [B, L, H], from N(lambda_mean, lambda_std), anew at
every call (every training step and every reverse step).
  additive:        z_i = e_i + lambda_i * (x_t + d_t)                 (DiffuRec)
  cross-attention: the query stream lambda_i * (x_t + d_t) attends over the history inside
                   every approximator block (see approximator.Block)  (DiffuRecSys "V1")
"""

from __future__ import annotations

import jax

MIXINGS = ("add", "cross_attention")


def draw_lambda(key, shape, mean: float, std: float) -> jax.Array:
  """lambda ~ N(mean, std) of `shape` ([B, L, H])."""
  return mean + std * jax.random.normal(key, shape)


def target_stream(x_t, step_embedding, lambdas) -> jax.Array:
  """lambda_i * (x_t + d_t): x_t [B, H], step_embedding [B, H], lambdas [B, L, H] -> [B, L, H]."""
  return lambdas * (x_t + step_embedding)[:, None, :]


def additive(history, x_t, step_embedding, lambdas) -> jax.Array:
  """Eq. 15: history [B, L, H] + lambda * (x_t + d_t) -> [B, L, H]."""
  return history + target_stream(x_t, step_embedding, lambdas)
