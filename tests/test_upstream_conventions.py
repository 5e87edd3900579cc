"""The official DiffuRec code's conventions, pinned on hand-computed cases (no torch needed).

bench/parity_upstream.py checks the `upstream` preset against the official modules
numerically; these tests pin each convention on its own so CI catches a regression.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax.models import attention
from diffurec_jax import config as config_lib
from diffurec_jax.models import layers
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.training import selection
from diffurec_jax.training import state as train_state
from tiny_model import HISTORY, NUM_ITEMS
from flax import nnx


def tiny_attention():
  module = attention.MultiHeadAttention(4, 1, 0.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 3, 4))
  key_mask = jnp.array([[False, True, True]])  # position 0 is padding
  return module, x, key_mask


@pytest.mark.slow
def test_a_padding_query_attends_uniformly_to_every_position():
  module, x, key_mask = tiny_attention()
  mask = attention.attention_mask(key_mask, 3, mask_padding_keys=False, causal=False,
                                  mask_padding_queries=True)
  out = module(x, x, mask)
  values = module.value(x)[0]  # [3, 4]
  expected_padding_row = module.out(values.mean(axis=0))
  np.testing.assert_allclose(out[0, 0], expected_padding_row, rtol=1e-5, atol=1e-6)
  # A real query reads every key, the padding key included: plain softmax over all three.
  q, k = module.query(x)[0], module.key(x)[0]
  weights = jax.nn.softmax(q[2] @ k.T / 2.0)  # sqrt(head_dim = 4) = 2
  np.testing.assert_allclose(out[0, 2], module.out(weights @ values), rtol=1e-5, atol=1e-6)


def test_masking_padding_keys_never_reads_them():
  module, x, key_mask = tiny_attention()
  mask = attention.attention_mask(key_mask, 3, mask_padding_keys=True, causal=False)
  changed = x.at[0, 0].set(100.0)  # the padding position's content
  chex.assert_trees_all_close(module(x, x, mask)[0, 1:], module(changed, changed, mask)[0, 1:],
                              rtol=1e-5)


@pytest.mark.parametrize("presets,block_output_dropout,expected_sites", [
    ("upstream", True, 2 + 5 * 4),   # embedding + final, and 5 per block (diffurec.py)
    ("diffurec", True, 2 + 5 * 4),   # the default adopts it
    ("diffurec", False, 2 + 4 * 4),  # without the block-output dropout
])
@pytest.mark.slow
def test_dropout_sites_of_one_training_forward(presets, block_output_dropout, expected_sites,
                                               monkeypatch):
  config = config_lib.apply_presets(config_lib.base_config(), presets)
  config.data.max_len = HISTORY.shape[1]
  config.model.update(hidden=16, num_heads=2, block_output_dropout=block_output_dropout)
  bundle = train_state.init_model(config, NUM_ITEMS)
  calls, real = [], attention.dropout

  def counting(x, rate, key):
    if key is not None and rate > 0:
      calls.append(x.shape)
    return real(x, rate, key)

  monkeypatch.setattr(attention, "dropout", counting)
  model_lib.denoise(bundle, HISTORY, jnp.zeros((HISTORY.shape[0], 16)),
                    jnp.zeros((HISTORY.shape[0],), jnp.int32), jax.random.key(0), train=True)
  assert len(calls) == expected_sites


@pytest.mark.parametrize("epsilon,expected", [
    (1e-12, 1.0),                            # the official code's TF-style epsilon
    (1e-6, 1e-4 / math.sqrt(1e-8 + 1e-6)),   # Flax's default shrinks a tiny-variance row
])
@pytest.mark.slow
def test_layer_norm_epsilon(epsilon, expected):
  norm = layers.layer_norm(4, layers.LayerStyle(layer_norm_eps=epsilon), rngs=nnx.Rngs(0))
  row = jnp.array([[1e-4, -1e-4, 1e-4, -1e-4]])  # mean 0, variance 1e-8
  np.testing.assert_allclose(norm(row)[0, 0], expected, rtol=1e-4)


def test_loss_over_all_columns_counts_the_padding_logit():
  logits = jnp.array([[2.0, 0.0, 1.0]])  # column 0 = padding
  targets, weights = jnp.array([2]), jnp.ones(1)
  x0, table = jnp.array([[1.0]]), jnp.array([[2.0], [0.0], [1.0]])
  with_padding = model_lib.weighted_cross_entropy(
      model_lib.score(x0, table, keep_padding=True), targets, weights)
  without = model_lib.weighted_cross_entropy(model_lib.score(x0, table), targets, weights)
  np.testing.assert_allclose(with_padding, math.log(math.e**2 + 1 + math.e) - 1, rtol=1e-6)
  np.testing.assert_allclose(without, math.log(1 + math.e) - 1, rtol=1e-6)
  del logits


@pytest.mark.parametrize("valid,improved", [
    ({"ndcg@10": 0.10, "hit@10": 0.20}, False),  # nothing beats its best
    ({"ndcg@10": 0.09, "hit@10": 0.21}, True),   # HR@10 alone improves: 'any' keeps it
])
def test_any_metric_selection(valid, improved):
  best = {"ndcg@10": 0.10, "hit@10": 0.20}
  assert selection.improved(valid, 0.10, best, "ndcg@10", "any") == improved
  assert not selection.improved(valid, 0.10, best, "ndcg@10", "metric")


@pytest.mark.slow
def test_torch_initialisation_bounds():
  style = layers.LayerStyle(init="torch")
  dense = layers.dense(64, 32, style, rngs=nnx.Rngs(0))
  bound = 1 / math.sqrt(64)
  assert float(jnp.abs(dense.kernel[...]).max()) <= bound
  assert float(jnp.abs(dense.bias[...]).max()) <= bound
  assert float(jnp.abs(dense.bias[...]).max()) > 0.5 * bound  # uniform, not zeros
  xavier = layers.dense(512, 512, style, xavier=True, rngs=nnx.Rngs(1))
  weights = np.asarray(xavier.kernel[...])
  np.testing.assert_allclose(weights.std(), math.sqrt(2 / 1024), rtol=0.02)
  assert np.abs(weights).max() > 3 * weights.std()  # a plain normal: torch does not truncate


def test_upstream_preset_sets_every_convention():
  config = config_lib.apply_presets(config_lib.base_config(), "upstream")
  model, train_config = config.model, config.train
  assert (model.position_embedding, model.mask_padding_keys, model.mask_padding_queries) == (
      False, False, True)
  assert (model.block_output_dropout, model.layer_norm_eps, model.init) == (True, 1e-12, "torch")
  assert (model.attention_key_bias, model.loss_padding_column, model.item_init_std) == (
      True, True, 1.0)
  assert (train_config.learning_rate, train_config.weight_decay, train_config.lr_decay_epochs,
          train_config.num_epochs, train_config.eval_every, train_config.patience,
          train_config.selection) == (1e-3, 0.0, 100, 500, 20, 5, "any")
  assert tuple(train_config.length_buckets) == ()
