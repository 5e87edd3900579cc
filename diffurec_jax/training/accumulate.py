"""Gradient accumulation over micro-batches: the whole batch's gradient in bounded memory.

A training step's activation memory grows with batch x length (and attention with length^2):
DiffuRecSys V1 at batch 1024 and max_len 100 peaked near 10 GB compiling and running one step
on a CPU (bench/compile_cost.py). Splitting the batch into k micro-batches inside the jitted step
(a `lax.scan` summing gradients) divides that by about k and leaves the update unchanged: the
losses are weighted means, sum_i w_i l_i / max(sum_i w_i, 1), so

  grad(whole batch) = sum_k grad(loss_k) * max(W_k, 1) / max(W, 1),   W_k = sum of w in k.

Micro-batch j takes rows j, j + k, j + 2k, ... so that a batch sharded over devices keeps its
sharding. The random streams differ from one whole-batch call (each micro-batch folds its index
into the step key): dropout, lambda and t are drawn from the same distributions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def num_microbatches(batch_size: int, length: int, max_tokens: int) -> int:
  """The fewest micro-batches k (k divides batch_size) with (batch_size / k) * length <=
  max_tokens; 1 when max_tokens <= 0 or the whole batch fits."""
  if max_tokens <= 0 or batch_size * length <= max_tokens:
    return 1
  for k in range(2, batch_size + 1):
    if batch_size % k == 0 and (batch_size // k) * length <= max_tokens:
      return k
  return batch_size


def split_rows(tree, k: int):
  """Every leaf [B, ...] -> [k, B / k, ...]; micro-batch j holds rows j, j + k, ..."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def value_and_grad(loss_fn: Callable, weight_fn: Callable, k: int) -> Callable:
  """(params, graphdef, batch, rng, schedule) -> (loss, grads) of the whole batch, computed
  over k micro-batches; `weight_fn(batch)` is the denominator of loss_fn's weighted mean."""
  whole = jax.value_and_grad(loss_fn)
  if k == 1:
    return whole

  def accumulated(params, graphdef, batch, rng, schedule):
    total = jnp.maximum(weight_fn(batch), 1.0)

    def body(carry, inputs):
      index, micro = inputs
      loss, grads = whole(params, graphdef, micro, jax.random.fold_in(rng, index), schedule)
      share = jnp.maximum(weight_fn(micro), 1.0) / total
      return jax.tree.map(lambda c, x: c + share * x, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), split_rows(batch, k)))
    return loss, grads

  return accumulated
