"""Tests of the model core: padding and position invariances, gradients, overfitting, jit,
the fast last-position path, padded rows in the loss, scoring, and offset noise.

Shapes are tiny (B = 4, L = 8 or 4, H = 16, 20 items, 2 blocks) and every batch shares those
shapes, so eager calls reuse each other's compiled primitives and the few jitted functions are
compiled once per module.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffurec_jax import config as config_lib
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.models import sasrec
from diffurec_jax import diffusion as schedule_lib
from diffurec_jax.training import state as train_state
from tiny_model import HIDDEN, HISTORY, MAX_LEN, NUM_ITEMS

NONE = ("none", 1.0, 0.1)
SHORT_HISTORY = HISTORY[:, 4:]
TARGETS = jnp.array([9, 5, 20, 1], jnp.int32)
# SASRec's next item at every position: the history shifted left, then the target.
NEXT_ITEMS = jnp.array([
    [0, 0, 0, 0, 0, 7, 5, 9],
    [0, 0, 0, 0, 2, 3, 4, 5],
    [0, 0, 0, 0, 0, 0, 11, 20],
    [0, 0, 0, 0, 6, 12, 19, 1],
], jnp.int32)
X_T = jnp.asarray(np.random.default_rng(11).standard_normal((4, HIDDEN)), jnp.float32)
STEPS = jnp.array([0, 5, 17, 31], jnp.int32)
RNG = jax.random.key(5)
# Training tests run without dropout: it is not what they test, and every random draw inside a
# jitted function costs seconds of compilation on 2 CPU cores.
NO_DROPOUT = dict(dropout=0.0, emb_dropout=0.0)


def small_config(variant, presets="", **model):
  """A tiny config of `variant` with extra comma-separated presets and model overrides."""
  config = config_lib.base_config()
  config_lib.apply_presets(config, ",".join(name for name in (variant, presets) if name))
  config.data.max_len = MAX_LEN
  config.model.update(dict(hidden=HIDDEN, num_blocks=2, num_heads=2, **model))
  return config


@functools.cache
def _bundle(variant, presets, model_items):
  return train_state.init_model(small_config(variant, presets, **dict(model_items)), NUM_ITEMS)


def make_bundle(variant, presets="", **model):
  return _bundle(variant, presets, tuple(sorted(model.items())))


def batch(weights=(1.0, 1.0, 1.0, 1.0)):
  return {"history": HISTORY, "targets": TARGETS, "weights": jnp.asarray(weights, jnp.float32)}


def max_abs_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


# Padding and positions.

@pytest.mark.parametrize("variant,presets,invariant", [
    ("diffurec", "", True),
    ("v1", "", True),
    ("diffurec", "upstream", False),
    ("v1", "upstream", False),
])
@pytest.mark.slow
def test_left_padding_invariance_follows_mask_padding_keys(variant, presets, invariant):
  bundle = make_bundle(variant, presets, lambda_std=0.0)
  model = bundle_lib.merge(bundle)
  assert model.approximator.mask_padding_keys == invariant
  long = model_lib.denoise(bundle, HISTORY, X_T, STEPS, RNG)
  short = model_lib.denoise(bundle, SHORT_HISTORY, X_T, STEPS, RNG)
  chex.assert_shape([long, short], (4, HIDDEN))
  chex.assert_tree_all_finite([long, short])
  if invariant:
    chex.assert_trees_all_close(long, short, atol=1e-5)
  else:
    # Upstream attends to the padding row's embedding: more padding, another output.
    assert max_abs_diff(long, short) > 1e-4


def test_sasrec_left_padding_invariance():
  bundle = make_bundle("sasrec")
  long = sasrec.last_hidden(bundle, HISTORY)
  short = sasrec.last_hidden(bundle, SHORT_HISTORY)
  chex.assert_shape([long, short], (4, HIDDEN))
  chex.assert_trees_all_close(long, short, atol=1e-5)


def test_recency_positions_count_from_the_most_recent_item():
  chex.assert_trees_all_equal(model_lib.recency_positions(4), jnp.array([3, 2, 1, 0]))
  chex.assert_trees_all_equal(model_lib.recency_positions(1), jnp.array([0]))


@pytest.mark.parametrize("presets,order_matters", [("", True), ("nopos", False)])
def test_positions_make_the_order_of_the_history_matter(presets, order_matters):
  # The earlier items are reordered, the most recent one stays last: without positions (and
  # with a non-causal mask) self-attention sees the same set and x0_hat cannot change.
  bundle = make_bundle("diffurec", presets, lambda_std=0.0)
  permuted = HISTORY.at[:, 4:7].set(HISTORY[:, jnp.array([6, 4, 5])])
  assert not np.array_equal(permuted[:2], HISTORY[:2])
  original = model_lib.denoise(bundle, HISTORY, X_T, STEPS, RNG)
  reordered = model_lib.denoise(bundle, permuted, X_T, STEPS, RNG)
  if order_matters:
    assert max_abs_diff(original[:2], reordered[:2]) > 1e-4
  else:
    chex.assert_trees_all_close(original, reordered, atol=1e-5)


# Training: gradients, overfitting, jit.

OPTIMIZER = optax.adam(1e-2)


@functools.partial(jax.jit, static_argnames=("graphdef", "noise_config"))
def diffusion_step(params, opt_state, graphdef, batch, rng, schedule, noise_config):
  loss, grads = jax.value_and_grad(model_lib.diffusion_loss)(params, graphdef, batch, rng,
                                                             schedule, noise_config)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads


@functools.partial(jax.jit, static_argnames="graphdef")
def sasrec_step(params, opt_state, graphdef, batch, rng):
  loss, grads = jax.value_and_grad(sasrec.sequence_loss)(params, graphdef, batch, rng)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads


def overfit(step, params, num_steps=30):
  """Adam on one fixed batch with one fixed rng: (losses, gradients of the first step)."""
  opt_state = OPTIMIZER.init(params)
  losses, first_grads = [], None
  for _ in range(num_steps):
    params, opt_state, loss, grads = step(params, opt_state)
    losses.append(float(loss))
    first_grads = grads if first_grads is None else first_grads
  return losses, first_grads


@pytest.fixture(scope="module")
def schedule():
  return schedule_lib.make_schedule("trunc_lin", 32)


@pytest.fixture(scope="module")
def diffusion_runs(schedule):
  """30 overfitting steps of diffurec and v2 (v2 is the V1 cross-attention stack + offset noise)."""
  runs = {}
  for variant in ("diffurec", "v2"):
    config = small_config(variant)
    noise = config.offset_noise
    noise_config = (noise.mode, noise.delta_c, noise.scale)
    bundle = make_bundle(variant, **NO_DROPOUT)
    step = functools.partial(diffusion_step, graphdef=bundle.graphdef, batch=batch(), rng=RNG,
                             schedule=schedule, noise_config=noise_config)
    runs[variant] = overfit(step, bundle.params)
  return runs


@pytest.mark.parametrize("variant", ["diffurec", "v2"])
@pytest.mark.slow
def test_diffusion_loss_is_finite_and_decreases_when_overfitting(diffusion_runs, variant):
  losses, _ = diffusion_runs[variant]
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_sasrec_loss_is_finite_and_decreases_when_overfitting():
  bundle = make_bundle("sasrec", **NO_DROPOUT)
  sasrec_batch = {"history": HISTORY, "next_items": NEXT_ITEMS, "weights": jnp.ones(4)}
  step = functools.partial(sasrec_step, graphdef=bundle.graphdef, batch=sasrec_batch, rng=RNG)
  losses, _ = overfit(step, bundle.params)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_every_cross_attention_block_gets_a_gradient(diffusion_runs):
  _, grads = diffusion_runs["v2"]
  blocks = grads["approximator"]["blocks"]
  assert len(blocks) == 2
  for index in range(2):
    for part in ("cross", "cross_norm", "attention", "attention_norm", "ffn"):
      for path, leaf in jax.tree_util.tree_leaves_with_path(blocks[index][part]):
        name = jax.tree_util.keystr(path)
        # A key bias adds the same logit to every key of a query; softmax cancels it, so its
        # gradient is zero in exact arithmetic in any attention layer.
        if part in ("cross", "attention") and name.startswith("['key']['bias']"):
          continue
        norm = float(jnp.linalg.norm(leaf))
        assert np.isfinite(norm) and norm > 0, (index, part, name, norm)


@pytest.mark.slow
def test_jit_and_eager_agree(diffusion_runs, schedule):
  bundle = make_bundle("diffurec")
  jitted = jax.jit(model_lib.denoise, static_argnames="train")(bundle, HISTORY, X_T, STEPS, RNG)
  eager = model_lib.denoise(bundle, HISTORY, X_T, STEPS, RNG)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5)
  # The first overfitting step evaluated the jitted loss at the initial parameters.
  (first_loss, *_), _ = diffusion_runs["diffurec"]
  bundle = make_bundle("diffurec", **NO_DROPOUT)
  eager_loss = model_lib.diffusion_loss(bundle.params, bundle.graphdef, batch(), RNG, schedule,
                                        NONE)
  np.testing.assert_allclose(first_loss, float(eager_loss), rtol=1e-5, atol=1e-5)


# The fast last-position path.

@pytest.mark.parametrize("variant", ["diffurec", "v1"])
@pytest.mark.parametrize("causal", [False, True])
def test_last_only_matches_the_last_position_of_the_full_stack(variant, causal):
  bundle = make_bundle(variant, causal=causal)
  approximator = nnx.merge(bundle.graphdef, bundle.params).approximator
  assert approximator.causal == causal
  h, target = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, MAX_LEN, HIDDEN)),
                         jnp.float32)
  target = target if variant == "v1" else None
  key_mask = HISTORY > 0
  full = approximator(h, key_mask, target, last_only=False)
  last = approximator(h, key_mask, target, last_only=True)
  chex.assert_shape(full, (4, MAX_LEN, HIDDEN))
  chex.assert_shape(last, (4, 1, HIDDEN))
  chex.assert_trees_all_close(last[:, -1], full[:, -1], atol=1e-5)


def test_sasrec_last_hidden_matches_the_full_sequence():
  bundle = make_bundle("sasrec")
  full = bundle_lib.merge(bundle)(HISTORY, last_only=False)
  chex.assert_trees_all_close(sasrec.last_hidden(bundle, HISTORY), full[:, -1], atol=1e-5)


# Padded rows in the loss.

@pytest.mark.parametrize("logits,targets,weights,expected_rows", [
    # The padded row (target 0, weight 0) is the only one whose label logit is -inf.
    ([[-np.inf, 1.0, 2.0, 0.5], [-np.inf, 0.0, 0.0, 0.0]], [2, 0], [1.0, 0.0], [0]),
    ([[-np.inf, 1.0, 2.0, 0.5], [-np.inf, 3.0, -1.0, 0.0], [-np.inf, 5.0, 5.0, 5.0]],
     [3, 1, 0], [1.0, 1.0, 0.0], [0, 1]),
    ([[-np.inf, 0.0, 0.0]], [1], [1.0], [0]),  # log 2
])
def test_weighted_cross_entropy_ignores_padded_rows(logits, targets, weights, expected_rows):
  logits = np.asarray(logits, np.float64)
  rows = [-(logits[row, targets[row]] - np.log(np.sum(np.exp(logits[row, 1:]))))
          for row in expected_rows]
  loss = model_lib.weighted_cross_entropy(jnp.asarray(logits, jnp.float32),
                                          jnp.asarray(targets), jnp.asarray(weights))
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), np.mean(rows), rtol=1e-6)


def test_padded_row_leaves_the_diffusion_loss_unchanged(schedule):
  bundle = make_bundle("diffurec", **NO_DROPOUT)
  loss = functools.partial(model_lib.diffusion_loss, bundle.params, bundle.graphdef, rng=RNG,
                           schedule=schedule, noise_config=NONE)
  full = loss(batch())
  without_row = loss(batch(weights=(1.0, 1.0, 0.0, 1.0)))
  # Row 2 as batches.build pads it: label 0, weight 0 (here with an all-padding history too).
  padded = batch(weights=(1.0, 1.0, 0.0, 1.0))
  padded["history"] = HISTORY.at[2].set(0)
  padded["targets"] = TARGETS.at[2].set(0)
  padded_loss = loss(padded)
  assert np.isfinite(float(padded_loss))
  assert abs(float(full) - float(without_row)) > 1e-4  # The row does count when weighted.
  np.testing.assert_allclose(float(padded_loss), float(without_row), rtol=1e-5)


# Scoring.

def test_score_is_the_dot_product_with_padding_at_minus_inf():
  table = jnp.array([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
  x0 = jnp.array([[2.0, 3.0], [-1.0, 0.5]])
  expected = np.array([[-np.inf, 2.0, 3.0, -1.0], [-np.inf, -1.0, 0.5, -1.5]])
  scores = model_lib.score(x0, table)
  chex.assert_shape(scores, (2, 4))
  np.testing.assert_array_equal(np.asarray(scores), expected)
  # Leading dimensions (seeds) broadcast.
  chex.assert_shape(model_lib.score(jnp.stack([x0, x0, x0]), table), (3, 2, 4))


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.125])
def test_score_scale_multiplies_every_logit_but_padding(scale):
  table = jnp.array([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
  x0 = jnp.array([[2.0, 3.0]])
  expected = np.array([[-np.inf, 2.0 * scale, 3.0 * scale, -1.0 * scale]])
  np.testing.assert_array_equal(np.asarray(model_lib.score(x0, table, scale)), expected)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_the_training_loss_uses_the_model_score_scale(schedule, scale):
  bundle = make_bundle("diffurec", score_scale=scale, **NO_DROPOUT)
  assert model_lib.score_scale(bundle) == scale
  loss = model_lib.diffusion_loss(bundle.params, bundle.graphdef, batch(), RNG, schedule, NONE)
  # The same forward pass by hand: Algorithm 1's draws, then scale * x0_hat . E^T.
  t_key, noise_key, model_key = jax.random.split(RNG, 3)
  table = model_lib.item_table(bundle)
  t = jax.random.randint(t_key, (4,), 0, schedule.betas.shape[0])
  eps = schedule_lib.training_noise(noise_key, (4, HIDDEN), *NONE)
  x_t = schedule_lib.q_sample(schedule, table[TARGETS], t, eps)
  x0_hat = model_lib.denoise(bundle, HISTORY, x_t, schedule.timesteps[t], model_key, train=True)
  logits = scale * (np.asarray(x0_hat) @ np.asarray(table).T)
  logits[:, 0] = -np.inf
  rows = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)[jnp.arange(4), TARGETS]
  np.testing.assert_allclose(float(loss), -float(jnp.mean(rows)), rtol=1e-5)


@pytest.mark.parametrize("presets,std", [("", 0.02), ("paper", 1.0), ("upstream", 1.0)])
def test_item_table_init_scale_follows_the_config(presets, std):
  table = np.asarray(model_lib.item_table(make_bundle("diffurec", presets)))
  # 21 x 16 standard-normal draws: the sample std is within 20% of the configured one.
  assert abs(table.std() / std - 1.0) < 0.2


def test_score_of_a_model_table():
  bundle = make_bundle("diffurec")
  table = model_lib.item_table(bundle)
  chex.assert_shape(table, (NUM_ITEMS + 1, HIDDEN))
  scores = model_lib.score(X_T, table)
  chex.assert_shape(scores, (4, NUM_ITEMS + 1))
  assert np.all(np.isneginf(np.asarray(scores[:, 0])))
  np.testing.assert_allclose(scores[:, 1:], np.asarray(X_T) @ np.asarray(table[1:]).T,
                             rtol=1e-5, atol=1e-5)


# Offset noise: training only.

@pytest.mark.parametrize("variant,noise_config,changes", [
    ("v2", ("constant", 50.0, 0.1), True),
    ("v2", ("per_example", 1.0, 5.0), True),
    ("v2", ("constant", 0.0, 0.1), False),
    ("v2", ("per_example", 1.0, 0.0), False),
    # With additive mixing and a constant lambda, an offset shared by all hidden units is
    # removed by the next LayerNorm: DiffuRec cannot see DiffuRecSys's offset noise.
    ("diffurec", ("constant", 50.0, 0.1), False),
])
def test_offset_noise_changes_the_training_loss(schedule, variant, noise_config, changes):
  # A large lambda lets x_t, hence its noise, weigh on x0_hat.
  bundle = make_bundle(variant, lambda_mean=0.5, lambda_std=0.0, **NO_DROPOUT)
  loss = functools.partial(model_lib.diffusion_loss, bundle.params, bundle.graphdef, batch(),
                           RNG, schedule)
  difference = abs(float(loss(noise_config=noise_config)) - float(loss(noise_config=NONE)))
  if changes:
    assert difference > 1e-3
  else:
    assert difference < 1e-5
