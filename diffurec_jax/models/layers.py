"""Dense and LayerNorm layers built to one of two conventions: the DiffuRec code's or Flax's.

`LayerStyle.init`:
  torch  as DiffuRec's PyTorch code: weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform
         with a = sqrt(5)), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); Xavier-normal weights
         where the code asks for them (attention output, feed-forward).
  flax   Flax's defaults: lecun-normal weights, zero biases (Xavier-normal where asked).
`LayerStyle.layer_norm_eps` is the LayerNorm epsilon (DiffuRec: 1e-12, TF style, inside the
square root). The variance is always computed as mean((x - mean)^2), as the DiffuRec code
does, never as mean(x^2) - mean^2, which cancels badly with a tiny epsilon.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

INITS = ("torch", "flax")


@dataclasses.dataclass(frozen=True)
class LayerStyle:
  init: str = "torch"
  layer_norm_eps: float = 1e-12
  key_bias: bool = False  # Attention key projection bias (softmax over keys cancels it).

  @classmethod
  def from_config(cls, model_config) -> "LayerStyle":
    if model_config.init not in INITS:
      raise ValueError(f"model.init={model_config.init!r}; use one of {INITS}.")
    return cls(init=model_config.init, layer_norm_eps=float(model_config.layer_norm_eps),
               key_bias=bool(model_config.attention_key_bias))


def torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's nn.Linear default for weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dense(in_features: int, out_features: int, style: LayerStyle, *, rngs: nnx.Rngs,
          xavier: bool = False, use_bias: bool = True) -> nnx.Linear:
  """nnx.Linear [in] -> [out] initialised by `style` (Xavier-normal weights when `xavier`)."""
  if xavier:  # torch's xavier_normal_ is a plain normal; Flax's truncates at 2 std.
    kernel_init = (nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")
                   if style.init == "torch" else nnx.initializers.xavier_normal())
  elif style.init == "torch":
    kernel_init = torch_uniform(in_features)
  else:
    kernel_init = nnx.initializers.lecun_normal()
  bias_init = torch_uniform(in_features) if style.init == "torch" else nnx.initializers.zeros
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=bias_init, rngs=rngs)


def layer_norm(features: int, style: LayerStyle, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis with the style's epsilon and the two-pass variance."""
  return nnx.LayerNorm(features, epsilon=style.layer_norm_eps, use_fast_variance=False,
                       rngs=rngs)
