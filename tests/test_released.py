"""The `v1_released` / `v2_released` switches: DiffuRecSys's released code, reproduced.

Hand cases for the linear cross-attention (keys normalised over heads), a NumPy transcription
of the released TransformerBlock (diffurec.py: CrossAttention, MultiHeadedAttention,
TransformerBlock) checked against our Block with the released switches, dead blocks when every
block reads the input, the per-element "offset" noise, and the presets' fields. Tiny shapes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffurec_jax.models import approximator as approximator_lib
from diffurec_jax.models import attention
from diffurec_jax import config as config_lib
from diffurec_jax.models import layers
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax import diffusion as schedule_lib
from diffurec_jax.training import state as train_state
from tiny_model import HIDDEN, HISTORY, MAX_LEN, NUM_ITEMS

TORCH_STYLE = layers.LayerStyle(init="torch", layer_norm_eps=1e-12, key_bias=True)
KEY_MASK = HISTORY > 0  # [4, 8]: padding on the left.
RELEASED_SWITCHES = dict(cross_form="linear_heads", share_cross_attention_norm=True,
                         cross_fill_padding_queries=True, every_block_reads_input=True,
                         mask_padding_keys=False, mask_padding_queries=True,
                         block_output_dropout=False)


def _inputs(seed, shape=(4, MAX_LEN, HIDDEN)):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(shape), jnp.float32),
          jnp.asarray(rng.standard_normal(shape), jnp.float32))


def _identity_keys(module, hidden):
  module.key.kernel[...] = jnp.eye(hidden)
  module.key.bias[...] = jnp.zeros(hidden)


# --- Linear cross-attention: hand cases ---------------------------------------------------

@pytest.mark.slow
def test_released_key_softmax_runs_over_the_heads_axis():
  # k = [0, ln 3 | ln 3, 0] (2 heads of 2 features): feature 0 is softmax(0, ln 3) over the two
  # heads = (1/4, 3/4), feature 1 is softmax(ln 3, 0) = (3/4, 1/4).
  module = attention.LinearAttention(4, 2, 0.0, "heads", TORCH_STYLE, rngs=nnx.Rngs(0))
  _identity_keys(module, 4)
  log3 = float(np.log(3.0))
  keys_values = jnp.array([[[0.0, log3, log3, 0.0]]])
  weights = module.key_weights(keys_values)
  chex.assert_shape(weights, (1, 1, 2, 2))
  np.testing.assert_allclose(weights[0, 0], [[0.25, 0.75], [0.75, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(weights.sum(axis=2), 1.0, rtol=1e-6)


@pytest.mark.parametrize("key_axis, sum_axis", [("heads", 2), ("sequence", 1)])
def test_key_weights_sum_to_one_over_their_axis(key_axis, sum_axis):
  module = attention.LinearAttention(HIDDEN, 4, 0.0, key_axis, TORCH_STYLE, rngs=nnx.Rngs(1))
  weights = module.key_weights(_inputs(1)[0])
  chex.assert_shape(weights, (4, MAX_LEN, 4, HIDDEN // 4))
  np.testing.assert_allclose(weights.sum(axis=sum_axis), 1.0, rtol=1e-5)


@pytest.mark.parametrize("key_axis", ["heads", "sequence"])
def test_masked_keys_weigh_nothing(key_axis):
  module = attention.LinearAttention(HIDDEN, 4, 0.0, key_axis, TORCH_STYLE, rngs=nnx.Rngs(2))
  weights = module.key_weights(_inputs(2)[0], KEY_MASK)
  np.testing.assert_array_equal(np.asarray(weights)[~np.asarray(KEY_MASK)], 0.0)
  if key_axis == "sequence":
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("form", ["dot_product", "linear_heads"])
def test_filled_query_rows_are_the_projection_of_minus_1e9(form):
  rngs = nnx.Rngs(3)
  if form == "dot_product":
    module = attention.MultiHeadAttention(HIDDEN, 2, 0.0, TORCH_STYLE, rngs=rngs)
  else:
    module = attention.LinearAttention(HIDDEN, 2, 0.0, "heads", TORCH_STYLE, rngs=rngs)
  queries, keys_values = _inputs(3)
  out = module(queries, keys_values, None, KEY_MASK)  # No key mask; fill padding queries.
  filled = module.out(jnp.full((HIDDEN,), -1e9))
  padding = np.asarray(~KEY_MASK)
  np.testing.assert_allclose(np.asarray(out)[padding],
                             np.broadcast_to(filled, (padding.sum(), HIDDEN)), rtol=1e-6)
  np.testing.assert_allclose(out[KEY_MASK], module(queries, keys_values, None)[KEY_MASK],
                             rtol=1e-6)


# --- The released block, transcribed from diffurec.py in NumPy (float64) --------------------

def _np(x):
  return np.asarray(x, np.float64)


def _linear(x, layer):
  y = x @ _np(layer.kernel[...])
  return y if layer.bias is None else y + _np(layer.bias[...])


def _layer_norm(x, norm, eps=1e-12):
  u = x.mean(-1, keepdims=True)
  s = ((x - u) ** 2).mean(-1, keepdims=True)
  return _np(norm.scale[...]) * (x - u) / np.sqrt(s + eps) + _np(norm.bias[...])


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _heads(x, num_heads):  # torch: .view(B, -1, n, d).transpose(1, 2) -> [B, n, L, d]
  batch, length, hidden = x.shape
  return x.reshape(batch, length, num_heads, hidden // num_heads).transpose(0, 2, 1, 3)


def _merge(x):  # torch: .transpose(1, 2).contiguous().view(B, -1, n * d)
  batch, heads, length, dim = x.shape
  return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * dim)


def _released_cross_attention(x, x_t, mask, module, num_heads):
  """CrossAttention.forward(x, x_t, emb_t, mask) in eval mode."""
  q = _heads(_linear(x_t, module.query), num_heads)
  k = _heads(_linear(x, module.key), num_heads)
  v = _heads(_linear(x, module.value), num_heads)
  query = _softmax(q, axis=-1)
  key = _softmax(k, axis=1)  # dim=1 of [B, n, L, d]: the heads axis.
  hidden = query @ (key.transpose(0, 1, 3, 2) @ v)
  hidden = np.where(mask[:, None, :, None] == 0, -1e9, hidden)
  return _linear(_merge(hidden), module.out)


def _released_self_attention(x, mask, module, num_heads):
  """MultiHeadedAttention.forward(x, x, x, mask) in eval mode: the mask masks query rows."""
  q, k, v = (_heads(_linear(x, layer), num_heads)
             for layer in (module.query, module.key, module.value))
  corr = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  corr = np.where(mask[:, None, :, None] == 0, -1e9, corr)
  return _linear(_merge(_softmax(corr, axis=-1) @ v), module.out)


def _released_block(x, x_t, mask, block, num_heads):
  """TransformerBlock.forward(x, x_t, emb_t, mask): input_sublayer serves both attentions."""
  norm = lambda h: _layer_norm(h, block.attention_norm)  # noqa: E731
  hidden = x + _released_cross_attention(norm(x), x_t, mask, block.cross, num_heads)
  hidden = hidden + _released_self_attention(norm(hidden), mask, block.attention, num_heads)
  inner = _linear(_layer_norm(hidden, block.ffn_norm), block.ffn.inner)
  gelu = 0.5 * inner * (1 + np.tanh(np.sqrt(2 / np.pi) * (inner + 0.044715 * inner ** 3)))
  return hidden + _linear(gelu, block.ffn.outer)


def _released_approximator(**overrides):
  switches = dict(RELEASED_SWITCHES, **overrides)
  return approximator_lib.Approximator(HIDDEN, 3, 4, 0.0, cross_attention=True, causal=False,
                                       style=TORCH_STYLE, rngs=nnx.Rngs(7), **switches)


@pytest.mark.slow
def test_released_block_matches_the_transcribed_diffurecsys_block():
  approx = _released_approximator()
  block = approx.blocks[-1]
  assert block.cross_norm is None  # One LayerNorm before both attentions.
  x, target = _inputs(4)
  mask = _np(KEY_MASK)
  expected = _layer_norm(_released_block(_np(x), _np(target), mask, block, 4), approx.final_norm)
  got = approx(x, KEY_MASK, target, last_only=True)
  chex.assert_shape(got, (4, 1, HIDDEN))
  np.testing.assert_allclose(got[:, 0], expected[:, -1], rtol=2e-4, atol=2e-4)
  # The full sequence too: padding rows carry the -1e9 fill through the residual stream.
  full = approx(x, KEY_MASK, target, last_only=False)
  np.testing.assert_allclose(full, expected, rtol=2e-4, atol=2e-4)


# --- Dead blocks ------------------------------------------------------------------------------

def _perturb_all_but_last_block(approx):
  for block in list(approx.blocks)[:-1]:
    params = nnx.state(block, nnx.Param)
    nnx.update(block, jax.tree.map(lambda p: p + 0.5, params))


@pytest.mark.parametrize("every_block_reads_input, changes", [(True, False), (False, True)])
def test_only_the_last_block_counts_when_every_block_reads_the_input(every_block_reads_input,
                                                                     changes):
  approx = _released_approximator(every_block_reads_input=every_block_reads_input)
  x, target = _inputs(5)
  before = approx(x, KEY_MASK, target, last_only=True)
  _perturb_all_but_last_block(approx)
  after = approx(x, KEY_MASK, target, last_only=True)
  assert bool(jnp.any(jnp.abs(after - before) > 1e-3)) == changes


# --- Parameters and the model built from the presets -----------------------------------------

def _small(preset):
  config = config_lib.base_config()
  config_lib.apply_presets(config, preset)
  config.data.max_len = MAX_LEN
  config.model.update(hidden=HIDDEN, num_blocks=2, num_heads=2)
  return config


def _expected_param_count(h, blocks, released):
  """Hand count: item table, positions, embedding norm, step MLP, blocks, final norm."""
  attention_count = 4 * h * h + (4 if released else 3) * h  # q, k, v, out; key bias if released.
  block = (attention_count + (0 if released else 2 * h)  # cross-attention (+ its own norm).
           + 2 * h + attention_count  # self-attention and its norm.
           + 2 * h + 8 * h * h + 5 * h)  # feed-forward and its norm.
  positions = 0 if released else MAX_LEN * h
  return ((NUM_ITEMS + 1) * h + positions + 2 * h + (8 * h * h + 5 * h) + blocks * block
          + 2 * h)


@pytest.mark.parametrize("preset, released", [("v1", False), ("v2", False),
                                              ("v1_released", True), ("v2_released", True)])
def test_parameter_count_by_hand(preset, released):
  bundle = train_state.init_model(_small(preset), NUM_ITEMS)
  count = sum(x.size for x in jax.tree.leaves(bundle.params))
  assert count == _expected_param_count(HIDDEN, 2, released)


@pytest.mark.slow
def test_released_model_is_jittable_and_finite_in_training_and_evaluation():
  bundle = train_state.init_model(_small("v2_released"), NUM_ITEMS)
  x_t = jnp.asarray(np.random.default_rng(6).standard_normal((4, HIDDEN)), jnp.float32)
  steps = jnp.array([0, 5, 17, 31], jnp.int32)
  denoise = jax.jit(model_lib.denoise, static_argnames="train")
  for is_training in (False, True):
    x0_hat = denoise(bundle, HISTORY, x_t, steps, jax.random.key(0), train=is_training)
    chex.assert_shape(x0_hat, (4, HIDDEN))
    chex.assert_tree_all_finite(x0_hat)
  eager = model_lib.denoise(bundle, HISTORY, x_t, steps, jax.random.key(0))
  np.testing.assert_allclose(denoise(bundle, HISTORY, x_t, steps, jax.random.key(0)), eager,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_released_loss_trains_only_the_last_block():
  config = _small("v2_released")
  bundle = train_state.init_model(config, NUM_ITEMS)
  batch = {"history": HISTORY, "targets": jnp.array([9, 5, 20, 1], jnp.int32),
           "weights": jnp.ones(4)}
  noise = config.offset_noise
  loss, grads = jax.jit(jax.value_and_grad(model_lib.diffusion_loss), static_argnums=(1, 5))(
      bundle.params, bundle.graphdef, batch, jax.random.key(1),
      schedule_lib.make_schedule("trunc_lin", 32), (noise.mode, noise.delta_c, noise.scale))
  assert np.isfinite(float(loss))
  blocks = grads["approximator"]["blocks"]
  first, last = (jax.tree.leaves(blocks[index]) for index in (0, 1))
  chex.assert_tree_all_finite(grads)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in first)  # Dead: never reaches x0_hat.
  assert all(float(jnp.abs(g).max()) > 0.0 for g in last)


# --- Forward noise ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale, std", [(0.0, 1.0), (0.1, float(np.sqrt(1.01))), (1.0, 1.4142)])
def test_per_element_noise_is_zero_mean_with_variance_one_plus_scale_squared(scale, std):
  key = jax.random.key(8)
  shape = (4000, 64)
  plain = schedule_lib.training_noise(key, shape, "none")
  eps = schedule_lib.training_noise(key, shape, "per_element", scale=scale)
  chex.assert_shape(eps, shape)
  assert abs(float(eps.mean())) < 0.01
  assert float(eps.std()) == pytest.approx(std, rel=0.01)
  if scale:
    extra = (eps - plain) / scale
    # Drawn per element: it varies along H, unlike the per-example offset.
    assert float(extra.std(axis=-1).mean()) == pytest.approx(1.0, rel=0.05)
  else:
    np.testing.assert_array_equal(eps, plain)


# --- Presets ---------------------------------------------------------------------------------

RELEASED_FIELDS = {
    "variant": "v1",
    "model.hidden": 256, "model.num_blocks": 4, "model.num_heads": 4,
    "model.dropout": 0.1, "model.emb_dropout": 0.3, "model.mixing": "cross_attention",
    "model.cross_attention_form": "linear_heads", "model.share_cross_attention_norm": True,
    "model.cross_fill_padding_queries": True, "model.every_block_reads_input": True,
    "model.block_output_dropout": False, "model.position_embedding": False,
    "model.mask_padding_keys": False, "model.mask_padding_queries": True,
    "model.attention_key_bias": True, "model.loss_padding_column": True,
    "model.item_init_std": 1.0, "model.layer_norm_eps": 1e-12, "model.init": "torch",
    "data.max_len": 100, "train.batch_size": 512, "train.learning_rate": 1e-3,
    "train.weight_decay": 1e-4, "train.lr_decay_epochs": 30, "train.lr_decay_rate": 0.1,
    "train.num_epochs": 41, "train.eval_every": 8, "train.patience": 3, "train.selection": "any",
    "train.length_buckets": (), "offset_noise.mode": "none",
}
OURS = {"model.cross_attention_form": "dot_product", "model.share_cross_attention_norm": False,
        "model.cross_fill_padding_queries": False, "model.every_block_reads_input": False}


def _field(config, name):
  node = config
  for part in name.split("."):
    node = node[part]
  return node


@pytest.mark.parametrize("preset, fields", [
    ("v1_released", RELEASED_FIELDS),
    ("v2_released", dict(RELEASED_FIELDS, variant="v2", **{
        "offset_noise.mode": "per_element", "offset_noise.scale": 0.1})),
    ("v1_released,smoke", {"model.cross_attention_form": "linear_heads",
                           "model.every_block_reads_input": True, "model.hidden": 32,
                           "data.max_len": 20, "train.batch_size": 64}),
    ("v1", dict(OURS, variant="v1", **{"model.hidden": 128, "data.max_len": 100,
                                       "train.batch_size": 1024, "offset_noise.mode": "none",
                                       "model.position_embedding": True})),
    ("v2", dict(OURS, variant="v2", **{"offset_noise.mode": "constant",
                                       "model.block_output_dropout": True})),
    ("", dict(OURS, variant="diffurec")),
    ("upstream", OURS),
])
def test_presets_set_their_fields(preset, fields):
  config = config_lib.apply_presets(config_lib.base_config(), preset)
  for name, value in fields.items():
    assert _field(config, name) == value, name


def test_toys_config_accepts_the_released_presets():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "toys.py"
  spec = importlib.util.spec_from_file_location("toys_config", path)
  toys = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(toys)
  config = toys.get_config("v1_released")
  assert (config.data.name, config.variant, config.model.hidden) == ("toys", "v1", 256)


@pytest.mark.parametrize("arg", ["v1_released,v2", "v1_released,v2_released",
                                 "sasrec,v1_released"])
def test_released_presets_are_variants(arg):
  with pytest.raises(ValueError, match="Choose one variant"):
    config_lib.apply_presets(config_lib.base_config(), arg)
