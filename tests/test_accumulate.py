"""Micro-batched gradients equal the whole batch's (accumulate.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax.training import accumulate
from diffurec_jax import config as config_lib
from diffurec_jax.models import sasrec
from diffurec_jax.training import state as train_state
from diffurec_jax.training import optimizer as optimizer_lib
from tiny_model import HIDDEN, HISTORY, MAX_LEN, NUM_ITEMS


@pytest.mark.parametrize("batch_size, length, max_tokens, expected", [
    (512, 50, 32768, 1),     # DiffuRec's default step: never split.
    (1024, 100, 32768, 4),   # DiffuRecSys V1/V2 at max_len 100: 4 x 256 rows.
    (1024, 32, 32768, 1),    # Their shorter buckets fit.
    (1024, 100, 0, 1),       # 0 = off.
    (6, 10, 25, 3),          # 2 x 30 > 25, 3 x 20 fits.
    (7, 10, 25, 7),          # A prime batch: one row each.
    (4, 10, 5, 4),           # Nothing fits: one row each.
])
def test_num_microbatches(batch_size, length, max_tokens, expected):
  assert accumulate.num_microbatches(batch_size, length, max_tokens) == expected


def test_split_rows_interleaves():
  tree = {"x": jnp.arange(12).reshape(6, 2), "w": jnp.arange(6)}
  split = accumulate.split_rows(tree, 3)
  chex.assert_shape(split["x"], (3, 2, 2))
  np.testing.assert_array_equal(split["w"], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(split["x"][1], [[2, 3], [8, 9]])


def _weighted_mean_loss(params, graphdef, batch, rng, schedule):
  """A deterministic weighted mean: sum w (x . a - y)^2 / max(sum w, 1)."""
  del graphdef, rng, schedule
  residual = batch["x"] @ params["a"] + params["b"] - batch["y"]
  return jnp.sum(batch["w"] * residual ** 2) / jnp.maximum(jnp.sum(batch["w"]), 1.0)


@pytest.mark.parametrize("weights", [
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, 0, 1, 1, 0, 0, 1, 1],   # Padding rows spread over micro-batches.
    [1, 0, 0, 0, 1, 0, 0, 0],   # With k = 4, micro-batches 1-3 hold no real row.
    [0, 0, 0, 0, 0, 0, 0, 0],   # An all-padding batch: loss and gradient 0.
])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulated_equals_whole_batch(weights, k):
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.standard_normal(3), jnp.float32), "b": jnp.float32(0.5)}
  batch = {"x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal(8), jnp.float32),
           "w": jnp.asarray(weights, jnp.float32)}
  weight_fn = lambda b: jnp.sum(b["w"])
  whole = jax.value_and_grad(_weighted_mean_loss)(params, None, batch, jax.random.key(0), None)
  parts = jax.jit(accumulate.value_and_grad(_weighted_mean_loss, weight_fn, k),
                  static_argnums=1)(params, None, batch, jax.random.key(0), None)
  chex.assert_trees_all_close(parts, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sasrec_step_split_equals_whole():
  """The real SASRec loss without dropout (no randomness): a micro-batched train step gives the
  same loss and parameters as the whole batch; the weight counts real next-item positions."""
  config = config_lib.base_config()
  config_lib.apply_presets(config, "sasrec")
  config.data.max_len = MAX_LEN
  config.model.update(dict(hidden=HIDDEN, num_blocks=1, num_heads=2, dropout=0.0,
                           emb_dropout=0.0))
  next_items = jnp.concatenate([HISTORY[:, 1:], jnp.array([[9], [5], [20], [1]])], axis=1)
  batch = {"history": HISTORY, "next_items": next_items,
           "weights": jnp.array([1.0, 1.0, 0.0, 1.0])}
  bundle = train_state.init_model(config, NUM_ITEMS)
  tx = optimizer_lib.make_optimizer(config.train, 10)
  loss_fn = lambda params, graphdef, b, rng, schedule: sasrec.sequence_loss(params, graphdef, b,
                                                                           rng)
  results = []
  for max_tokens in (0, 2 * MAX_LEN):  # Whole, then 2 micro-batches of 2 rows.
    params = jax.tree.map(jnp.copy, bundle.params)  # The step donates its state.
    state = train_state.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    step = train_state.make_train_step(loss_fn, bundle.graphdef, tx,
                                 weight_fn=sasrec.sequence_loss_weight, max_tokens=max_tokens)
    state, loss = step(state, batch, jax.random.key(0), None)
    results.append((loss, state.params))
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-6)
