"""Tests of length buckets and fixed-shape batches, and that the bucketed fast path gives the
same training losses, predictions and evaluation ranks as padding everything to max_len.

A handmade dataset of 5 users (23 training prefixes, histories of 1 to 10 items) and a tiny
DiffuRec (H = 16, 20 items, 2 blocks, max_len 8, batches of 4, buckets (4, 8)).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax.data import batches
from diffurec_jax import config as config_lib
from diffurec_jax import metrics
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax import samplers as sample
from diffurec_jax.training import state as train_state
from diffurec_jax.data import splits

NUM_ITEMS = 20
HIDDEN = 16
MAX_LEN = 8
BATCH_SIZE = 4
BUCKETS = (4, MAX_LEN)
KEY = jax.random.key(7)
NONE = ("none", 1.0, 0.1)

SEQUENCES = [
    [1, 2, 3],
    [4, 5, 6, 7, 8, 9, 10],
    [11, 12],
    [13, 14, 15, 16, 17, 18, 19, 20, 1, 2, 3],  # Histories up to 10 items: truncated to 8.
    [5, 9, 13, 17, 2],
]
ITEMS = np.concatenate([np.asarray(sequence) for sequence in SEQUENCES]).astype(np.int32)


def prefix_examples(sequences):
  """Every prefix with at least one history item, target = the next item, user by user."""
  users, starts, ends = [], [], []
  offset = 0
  for user, sequence in enumerate(sequences):
    for end in range(offset + 1, offset + len(sequence)):
      users.append(user)
      starts.append(offset)
      ends.append(end)
    offset += len(sequence)
  ends = np.asarray(ends, np.int64)
  return splits.Examples(np.asarray(users, np.int32), np.asarray(starts, np.int64), ends,
                         ITEMS[ends])


EXAMPLES = prefix_examples(SEQUENCES)
HISTORY_LENGTHS = EXAMPLES.ends - EXAMPLES.starts


def small_config(**model):
  config = config_lib.base_config()
  config_lib.apply_presets(config, "diffurec")
  config.data.max_len = MAX_LEN
  config.model.update(dict(hidden=HIDDEN, num_blocks=2, num_heads=2, **model))
  return config


@pytest.fixture(scope="module")
def exact_bundle():
  """No dropout and a constant lambda: nothing random inside the model."""
  return train_state.init_model(small_config(dropout=0.0, emb_dropout=0.0, lambda_std=0.0), NUM_ITEMS)


@pytest.fixture(scope="module")
def schedule():
  return sample.sampling_schedule(small_config())


LOG_PROBS = jax.jit(sample.diffusion_log_probs,
                    static_argnames=("sampler", "num_seeds", "variance", "eta"))


def log_probs(bundle, history, users, schedule):
  # The options spelled out as test_sample.py does, so both share one compilation.
  return LOG_PROBS(bundle, jnp.asarray(history), jnp.asarray(users), KEY, schedule,
                   sampler="reverse", num_seeds=1, variance="beta", eta=0.0)


def build(plan):
  return {name: jnp.asarray(value)
          for name, value in batches.build(plan, EXAMPLES, ITEMS).items()}


def test_dataset_is_as_described():
  assert len(EXAMPLES) == 23
  np.testing.assert_array_equal(np.sort(np.unique(HISTORY_LENGTHS)), np.arange(1, 11))
  np.testing.assert_array_equal(EXAMPLES.targets[:3], [2, 3, 5])


# Tables.

@pytest.mark.parametrize("max_len,buckets,expected", [
    (50, (8, 16, 32), (8, 16, 32, 50)),
    (8, (8, 16), (8,)),
    (20, (), (20,)),
    (20, (16, 0, 8, 8, 30), (8, 16, 20)),
    (4, (8,), (4,)),
])
def test_bucket_lengths(max_len, buckets, expected):
  assert batches.bucket_lengths(max_len, buckets) == expected


@pytest.mark.parametrize("history_lengths,lengths,expected", [
    ([1, 4, 5, 8, 9, 100], (4, 8), [0, 0, 1, 1, 1, 1]),
    ([1, 2, 3], (2,), [0, 0, 0]),
    ([8, 9, 16, 17, 50, 51], (8, 16, 32, 50), [0, 1, 1, 2, 3, 3]),
    ([], (4, 8), []),
])
def test_assign_buckets(history_lengths, lengths, expected):
  assigned = batches.assign_buckets(np.asarray(history_lengths, np.int64), lengths)
  np.testing.assert_array_equal(assigned, expected)


@pytest.mark.parametrize("history_lengths,batch_size,lengths,expected", [
    ([3, 1, 9, 5, 2], 2, (4, 8), [(4, [0, 1]), (4, [4, -1]), (8, [2, 3])]),
    ([3, 1, 9, 5, 2], 4, (8,), [(8, [0, 1, 2, 3]), (8, [4, -1, -1, -1])]),
    ([7, 7], 3, (4, 8), [(8, [0, 1, -1])]),
    ([2, 9, 1], 1, (2, 4, 8), [(2, [0]), (2, [2]), (8, [1])]),
])
def test_eval_plan(history_lengths, batch_size, lengths, expected):
  plans = batches.eval_plan(np.asarray(history_lengths), batch_size, lengths)
  assert [(plan.length, plan.indices.tolist()) for plan in plans] == expected


def test_build_pads_rows_with_weight_zero():
  # Example 14: user 3 with 6 history items 13..18, target 19; example 8: user 2, [11] -> 12.
  plan = batches.Plan(4, np.array([14, -1, 8, -1]))
  batch = batches.build(plan, EXAMPLES, ITEMS, next_items=True)
  expected = {
      "history": [[15, 16, 17, 18], [0, 0, 0, 1], [0, 0, 0, 11], [0, 0, 0, 1]],
      "next_items": [[16, 17, 18, 19], [0, 0, 0, 2], [0, 0, 0, 12], [0, 0, 0, 2]],
      "targets": [19, 2, 12, 2],
      "users": [3, 0, 2, 0],
      "weights": [1.0, 0.0, 1.0, 0.0],
  }
  assert set(batch) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(batch[name], value, err_msg=name)
  assert batch["history"].dtype == np.int32 and batch["weights"].dtype == np.float32
  padded = batches.build(batches.Plan(MAX_LEN, plan.indices), EXAMPLES, ITEMS)
  np.testing.assert_array_equal(padded["history"][0], [0, 0, 13, 14, 15, 16, 17, 18])


# Epoch plans.

def flat(plans):
  return [(plan.length, plan.indices.tolist()) for plan in plans]


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
  plan = lambda seed, epoch: flat(batches.epoch_plan(HISTORY_LENGTHS, BATCH_SIZE, BUCKETS,
                                                     seed, epoch))
  assert plan(0, 3) == plan(0, 3)
  assert plan(0, 3) != plan(0, 4)
  assert plan(0, 3) != plan(1, 3)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_epoch_plan_covers_every_example_once_in_its_bucket(epoch):
  plans = batches.epoch_plan(HISTORY_LENGTHS, BATCH_SIZE, BUCKETS, seed=0, epoch=epoch)
  # Bucket 4 holds 15 examples (4 batches), bucket 8 holds 8 (2 batches).
  assert sorted(plan.length for plan in plans) == [4, 4, 4, 4, 8, 8]
  indices = np.concatenate([plan.indices for plan in plans])
  np.testing.assert_array_equal(np.sort(indices[indices >= 0]), np.arange(len(EXAMPLES)))
  assert np.sum(indices < 0) == 6 * BATCH_SIZE - len(EXAMPLES)
  for plan in plans:
    assert len(plan.indices) == BATCH_SIZE
    valid = plan.indices >= 0
    np.testing.assert_array_equal(valid, np.arange(BATCH_SIZE) < valid.sum())  # Pads last.
    lengths = HISTORY_LENGTHS[plan.indices[valid]]
    assert np.all(lengths <= plan.length) or plan.length == MAX_LEN
    if plan.length == MAX_LEN:
      assert np.all(lengths > 4)
    weights = batches.build(plan, EXAMPLES, ITEMS)["weights"]
    np.testing.assert_array_equal(weights, valid.astype(np.float32))


def test_epoch_plan_max_steps_keeps_the_first_batches():
  full = batches.epoch_plan(HISTORY_LENGTHS, BATCH_SIZE, BUCKETS, seed=2, epoch=5)
  capped = batches.epoch_plan(HISTORY_LENGTHS, BATCH_SIZE, BUCKETS, seed=2, epoch=5, max_steps=2)
  assert flat(capped) == flat(full[:2])


# The fast path equals the straightforward one.

@pytest.mark.slow
def test_bucketed_training_losses_equal_fully_padded(exact_bundle, schedule):
  """The same batches at their bucket length and at max_len, with the same step rng."""
  params, graphdef = exact_bundle.params, exact_bundle.graphdef
  plans = batches.epoch_plan(HISTORY_LENGTHS, BATCH_SIZE, BUCKETS, seed=0, epoch=0)
  assert {plan.length for plan in plans} == set(BUCKETS)
  bucketed, padded, rows = [], [], []
  for step, plan in enumerate(plans):
    rng = jax.random.fold_in(KEY, step)
    bucketed.append(float(model_lib.diffusion_loss(params, graphdef, build(plan), rng, schedule,
                                                   NONE)))
    full_plan = batches.Plan(MAX_LEN, plan.indices)
    padded.append(float(model_lib.diffusion_loss(params, graphdef, build(full_plan), rng,
                                                 schedule, NONE)))
    rows.append(np.sum(plan.indices >= 0))
  np.testing.assert_allclose(bucketed, padded, atol=1e-5)
  np.testing.assert_allclose(np.average(bucketed, weights=rows), np.average(padded, weights=rows),
                             atol=1e-5)


def per_example(lengths, compute):
  """compute(batch, indices) -> [B, ...] for the eval plan over `lengths`, gathered by example."""
  results = {}
  for plan in batches.eval_plan(HISTORY_LENGTHS, BATCH_SIZE, lengths):
    values = np.asarray(compute(build(plan), np.maximum(plan.indices, 0)))
    for row, index in enumerate(plan.indices):
      if index >= 0:
        results[int(index)] = values[row]
  assert sorted(results) == list(range(len(EXAMPLES)))
  return np.stack([results[index] for index in range(len(EXAMPLES))])


@pytest.mark.slow
def test_bucketed_predictions_and_loss_equal_fully_padded(exact_bundle):
  # Fixed x_t and t per example; the batches of the two paths hold different examples.
  x_t = jnp.asarray(np.random.default_rng(3).standard_normal((len(EXAMPLES), HIDDEN)),
                    jnp.float32)
  t = jnp.arange(len(EXAMPLES)) % 32

  def x0_hat(batch, indices):
    return model_lib.denoise(exact_bundle, batch["history"], x_t[indices], t[indices], KEY)

  bucketed, padded = per_example(BUCKETS, x0_hat), per_example((MAX_LEN,), x0_hat)
  chex.assert_shape(bucketed, (len(EXAMPLES), HIDDEN))
  np.testing.assert_allclose(bucketed, padded, atol=1e-5)
  table = model_lib.item_table(exact_bundle)
  targets, weights = jnp.asarray(EXAMPLES.targets), jnp.ones(len(EXAMPLES))
  losses = [model_lib.weighted_cross_entropy(model_lib.score(jnp.asarray(x0), table), targets,
                                             weights) for x0 in (bucketed, padded)]
  np.testing.assert_allclose(float(losses[0]), float(losses[1]), atol=1e-5)


def evaluate(bundle, schedule, lengths):
  """Per-example log probs and ranks, and the finalized metrics, over the eval plan."""
  totals = [{}]

  def compute(batch, indices):
    del indices
    scores = log_probs(bundle, batch["history"], batch["users"], schedule)
    sums, ranks = metrics.evaluate_batch(scores, batch["targets"], batch["weights"])
    totals[0] = metrics.accumulate(totals[0], sums)
    return jnp.concatenate([scores[:, 1:], ranks[:, None].astype(scores.dtype)], axis=1)

  gathered = per_example(lengths, compute)
  outputs = {"log_probs": gathered[:, :-1], "ranks": gathered[:, -1].astype(int)}
  return outputs, metrics.finalize(totals[0])


@pytest.mark.slow
def test_bucketed_evaluation_equals_fully_padded(exact_bundle, schedule):
  bucketed, bucketed_metrics = evaluate(exact_bundle, schedule, BUCKETS)
  padded, padded_metrics = evaluate(exact_bundle, schedule, (MAX_LEN,))
  np.testing.assert_array_equal(bucketed["ranks"], padded["ranks"])
  np.testing.assert_allclose(bucketed["log_probs"], padded["log_probs"], atol=1e-5)
  assert bucketed_metrics.keys() == padded_metrics.keys()
  for name, value in bucketed_metrics.items():
    assert value == pytest.approx(padded_metrics[name], rel=1e-6), name  # float32 batch sums.
  assert bucketed_metrics["users"] == len(EXAMPLES)


@pytest.mark.slow
def test_bucketed_sampling_equals_fully_padded_with_default_lambda_noise(schedule):
  bundle = train_state.init_model(small_config(), NUM_ITEMS)
  assert bundle_lib.merge(bundle).lambda_std > 0
  chosen = np.array([0, 8, 12, 22])
  history = batches.build(batches.Plan(MAX_LEN, chosen), EXAMPLES, ITEMS)["history"]
  assert np.all(history[:, :4] == 0) and np.all(history[:, -1] > 0)  # All fit in 4 columns.
  users = EXAMPLES.users[chosen]
  long = log_probs(bundle, history, users, schedule)
  short = log_probs(bundle, history[:, 4:], users, schedule)
  np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=1e-5)


@pytest.mark.parametrize("presets,mask,buckets,expected", [
    ("diffurec", True, (8, 16, 32), (8, 16, 32)),
    ("diffurec", False, (8, 16, 32), ()),
    ("diffurec,upstream", None, None, ()),
    ("v2,smoke", None, None, (8,)),
])
def test_bucket_config_needs_masked_padding_keys(presets, mask, buckets, expected):
  config = config_lib.base_config()
  config_lib.apply_presets(config, presets)
  if mask is not None:
    config.model.mask_padding_keys = mask
  if buckets is not None:
    config.train.length_buckets = buckets
  assert tuple(batches.bucket_config(config)) == expected
