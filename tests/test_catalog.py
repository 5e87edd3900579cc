"""The blockwise, item-sharded catalog (catalog.py) equals the dense path.

Dense references: optax's softmax CE over [B, N+1] logits, metrics.mask_items +
metrics.pessimistic_rank on samplers.ensemble_log_probs, lax.top_k. Sharded = unsharded runs in
one subprocess on 4 fake CPU devices (the device count is fixed when jax starts).
"""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffurec_jax import catalog
from diffurec_jax import sampled_softmax
from diffurec_jax import metrics
from diffurec_jax import samplers
from diffurec_jax.models import diffurec as model_lib
from helpers_train import synthetic_data, trained_workdir, trained_run  # noqa: F401  (fixtures)

NUM_ITEMS, HIDDEN, BATCH = 37, 8, 6


def _problem(seed=0, chains=1, integer=False):
  keys = jax.random.split(jax.random.key(seed), 4)
  if integer:  # Exact float scores: ties are real ties on every path.
    table = jax.random.randint(keys[0], (NUM_ITEMS + 1, HIDDEN), -2, 3).astype(jnp.float32)
    table = table.at[5].set(table[9]).at[20].set(table[9])  # Three items with equal rows.
    x = jax.random.randint(keys[1], (chains, BATCH, HIDDEN), -2, 3).astype(jnp.float32)
  else:
    table = jax.random.normal(keys[0], (NUM_ITEMS + 1, HIDDEN))
    x = jax.random.normal(keys[1], (chains, BATCH, HIDDEN))
  targets = jax.random.randint(keys[2], (BATCH,), 1, NUM_ITEMS + 1).at[0].set(9)
  history = jax.random.randint(keys[3], (BATCH, 5), 0, NUM_ITEMS + 1)
  history = history.at[0, 0].set(5).at[1, :].set(0).at[2, 1].set(targets[2])
  return x, table, targets, history


def _dense_log_probs(x, table, scale=1.0):
  return samplers.ensemble_log_probs(model_lib.score(x, table, scale))


@pytest.mark.parametrize("block", [1, 5, 8, 37, 38, 64])
@pytest.mark.parametrize("include_padding", [False, True])
def test_cross_entropy_and_gradients_equal_dense(block, include_padding):
  x, table, targets, _ = _problem()
  spec = catalog.Spec(NUM_ITEMS, block, scale=1.5)

  def blockwise(x, table):
    return jnp.mean(catalog.cross_entropy(x, table, targets, spec, include_padding))

  def dense(x, table):
    logits = model_lib.score(x, table, 1.5, keep_padding=include_padding)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  got, got_grads = jax.value_and_grad(blockwise, argnums=(0, 1))(x[0], table)
  want, want_grads = jax.value_and_grad(dense, argnums=(0, 1))(x[0], table)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  chex.assert_trees_all_close(got_grads, want_grads, atol=1e-6)


@pytest.mark.parametrize("chains", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [4, 16, 38])
def test_ranks_and_top_k_equal_dense_with_ties_and_masking(chains, masked, block):
  x, table, targets, history = _problem(seed=1, chains=chains, integer=True)
  log_probs = _dense_log_probs(x, table)
  if masked:
    log_probs = metrics.mask_items(log_probs, history, targets)
  want_ranks = metrics.pessimistic_rank(log_probs, targets)
  want_values, want_ids = jax.lax.top_k(log_probs, 7)
  ranks, values, ids = catalog.ranks_and_top_k(x, table, targets, catalog.Spec(NUM_ITEMS, block),
                                               history if masked else None, k=7)
  np.testing.assert_array_equal(ranks, want_ranks)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(values, want_values, atol=1e-5)
  assert int(ranks[0]) >= 3 - masked  # Target 9 ties with items 5 and 20 (5 is in history 0).


def test_top_k_masks_every_history_item_and_never_returns_padding():
  x, table, _, history = _problem(seed=2)
  log_probs = _dense_log_probs(x, table)
  hidden = metrics.mask_items(log_probs, history, jnp.zeros(BATCH, jnp.int32))
  want_values, want_ids = jax.lax.top_k(hidden, NUM_ITEMS - 6)
  values, ids = catalog.top_k(x, table, catalog.Spec(NUM_ITEMS, 8), NUM_ITEMS - 6, history)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(values, want_values, atol=1e-5)
  assert not np.isin(0, np.asarray(ids))
  for row in range(BATCH):
    finite = np.asarray(ids[row])[np.isfinite(np.asarray(values[row]))]
    assert not set(finite) & (set(np.asarray(history[row]).tolist()) - {0})


@pytest.mark.parametrize("chains", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [4, 16, 38])
def test_top_k_equals_dense_with_ties_and_masking(chains, masked, block):
  x, table, _, history = _problem(seed=5, chains=chains, integer=True)
  log_probs = _dense_log_probs(x, table)
  if masked:
    log_probs = metrics.mask_items(log_probs, history, jnp.zeros(BATCH, jnp.int32))
  want_values, want_ids = jax.lax.top_k(log_probs, 9)
  values, ids = catalog.top_k(x, table, catalog.Spec(NUM_ITEMS, block), 9,
                              history if masked else None)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(values, want_values, atol=1e-5)


@pytest.mark.parametrize("chains, passes", [(1, 1), (3, 2)])
def test_top_k_of_one_chain_reads_the_table_once(chains, passes):
  """One chain: the log-sum-exp accumulates beside the top-k, one matmul per block."""
  x, table, _, _ = _problem(seed=6, chains=chains)
  jaxpr = str(jax.make_jaxpr(lambda x, table: catalog.top_k(
      x, table, catalog.Spec(NUM_ITEMS, 8), 4))(x, table))
  assert jaxpr.count("dot_general") == passes, jaxpr


def test_nan_never_helps():
  x, table, targets, _ = _problem(seed=3)
  table = table.at[4].set(jnp.nan)  # A NaN competitor beats every target.
  ranks, _, _ = catalog.ranks_and_top_k(x, table, targets, catalog.Spec(NUM_ITEMS, 8))
  want = metrics.pessimistic_rank(_dense_log_probs(x, table), targets)
  np.testing.assert_array_equal(ranks, want)


@pytest.mark.parametrize("rows, shards, expected", [(37, 1, 38), (37, 2, 38), (37, 4, 40),
                                                    (1_000_000, 3, 1_000_002)])
def test_table_rows(rows, shards, expected):
  assert catalog.table_rows(rows, shards) == expected


@pytest.mark.parametrize("rows, block, expected", [
    (10_001, 8192, (5001, 2)), (38, 4, (4, 10)), (37, 16, (13, 3)), (38, 38, (38, 1)),
    (38, 64, (38, 1)), (1_000_001, 8192, (8131, 123)), (5, 1, (1, 5))])
def test_blocking_takes_the_fewest_equal_blocks(rows, block, expected):
  got_block, count = catalog.blocking(rows, block)
  assert (got_block, count) == expected
  assert got_block <= block and got_block * count >= rows > got_block * (count - 1)


def test_memory_stays_per_block():
  """Compiled temporaries of the blockwise loss stay far below one [B, N] logit matrix."""
  num_items, batch = 200_000, 64
  table = jnp.zeros((num_items + 1, 32))
  x, targets = jnp.ones((batch, 32)), jnp.ones((batch,), jnp.int32)
  spec = catalog.Spec(num_items, 2048)
  loss = lambda x, table: jnp.mean(catalog.cross_entropy(x, table, targets, spec))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, table).compile()
  dense_logits = batch * (num_items + 1) * 4
  temp = compiled.memory_analysis().temp_size_in_bytes
  gradient_of_table = table.size * 4
  assert temp < gradient_of_table + dense_logits / 4, (temp, dense_logits)


_SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from diffurec_jax import catalog, sampled_softmax
sys.path.insert(0, sys.argv[1])
import test_catalog as t

x, table, targets, history = t._problem(seed=4, chains=2)
rows = catalog.table_rows(t.NUM_ITEMS, 4)
table = jnp.concatenate([table, jnp.full((rows - table.shape[0], t.HIDDEN), 7.0)])  # Padding rows.
spec = catalog.Spec(t.NUM_ITEMS, 4)
sampled = sampled_softmax.make(16, *sampled_softmax.sampling_distributions(
    np.arange(t.NUM_ITEMS + 1.0), "popularity"))

def everything(x, table):
  def loss(x0, table):  # Gradients through lookups too: the model embeds with them.
    x0 = x0 + 0.5 * catalog.lookup(table, targets) + catalog.lookup(table, history).mean(1)
    return jnp.mean(catalog.cross_entropy(x0, table, targets, spec))

  def sampled_loss(x0, table):  # The sampled softmax reads the table through lookups only.
    return jnp.mean(sampled_softmax.sampled_cross_entropy(
        x0, table, targets, targets, jax.random.key(2), sampled))

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x[0], table)
  sampled_value, sampled_grads = jax.value_and_grad(sampled_loss, argnums=(0, 1))(x[0], table)
  ranks, values, ids = catalog.ranks_and_top_k(x, table, targets, spec, history, k=5)
  looked = catalog.lookup(table, history)
  one_values, one_ids = catalog.top_k(x[:1], table, spec, 5, history)
  return {"loss": value, "grad_x": grads[0], "grad_table": grads[1], "ranks": ranks,
          "top_values": values, "top_ids": ids, "lookup": looked,
          "one_chain_values": one_values, "one_chain_ids": one_ids,
          "sampled_loss": sampled_value, "sampled_grad_x": sampled_grads[0],
          "sampled_grad_table": sampled_grads[1]}

out = {"single": jax.tree.map(np.asarray, jax.jit(everything)(x, table))}
for shape in [(2, 2), (1, 4), (4, 1)]:
  mesh = jax.make_mesh(shape, ("data", "items"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    placed_table = jax.device_put(table, jax.sharding.NamedSharding(mesh, jax.P("items")))
    got = jax.tree.map(np.asarray, jax.jit(everything)(x, placed_table))
  out[str(shape)] = got

def gradient_temporaries(shape, rows=40_000, hidden=32, batch=8):
  # XLA's temporaries of one gradient of lookups + loss, counted in shards of the table.
  mesh = jax.make_mesh(shape, ("data", "items"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  big = jnp.zeros((rows, hidden))
  ids, x0 = jnp.ones((batch, 5), jnp.int32), jnp.ones((batch, hidden))
  def loss(table):
    x = x0 + catalog.lookup(table, ids[:, 0]) + catalog.lookup(table, ids).mean(1)
    return jnp.mean(catalog.cross_entropy(x, table, ids[:, 0], catalog.Spec(rows - 1, 4096)))
  with jax.set_mesh(mesh):
    placed = jax.device_put(big, jax.sharding.NamedSharding(mesh, jax.P("items")))
    temp = jax.jit(jax.grad(loss)).lower(placed).compile().memory_analysis().temp_size_in_bytes
  return temp / (big.size * 4 / shape[1])

temporaries = {str(shape): gradient_temporaries(shape) for shape in [(1, 4), (2, 2)]}
result = {}
for name, got in out.items():
  result[name] = {key: float(np.max(np.abs(got[key].astype(float) - out["single"][key]
                                           .astype(float)))) for key in got}
print(json.dumps({"differences": result, "temporaries": temporaries}))
"""


@pytest.mark.slow
def test_sharded_equals_unsharded_on_four_devices():
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip())
  done = subprocess.run([sys.executable, "-c", _SHARDED, os.path.dirname(__file__)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  # One gradient-sized buffer per device, whatever the number of uses of the table: summed
  # over the 'data' axis once (catalog._sharded), not one all-reduce per use (was 6 shards).
  for mesh, shards in result["temporaries"].items():
    assert shards < 2, (mesh, shards)
  for mesh, differences in result["differences"].items():
    for key in ("ranks", "top_ids", "one_chain_ids"):
      assert differences[key] == 0, (mesh, key, differences)
    for key, difference in differences.items():
      assert difference < 1e-5, (mesh, key, difference)


@pytest.mark.slow
@pytest.mark.parametrize("mask_history", [False, True])
def test_blockwise_evaluation_and_recommendations_equal_dense(trained_workdir, mask_history):
  """A trained run evaluated and served with catalog.block = 7: the dense path's figures."""
  from diffurec_jax import evaluate, serve, sharding
  loaded, dataset = evaluate.load_with_data(str(trained_workdir), seeds=2)
  results = {}
  for block in (0, 7):
    config = loaded.config.copy_and_resolve_references()
    config.catalog.block, config.train.mask_history = block, mask_history
    evaluator = evaluate.Evaluator(config, dataset, sharding.make_mesh())
    metrics_, per_user = evaluator.evaluate(loaded.bundle, "test", progress=False)
    served, _ = serve.recommend(dataclasses.replace(loaded, config=config), ["a", "b"],
                                [[str(loaded.item_ids[3]), str(loaded.item_ids[5])],
                                 [str(loaded.item_ids[7])]], topk=5, progress=False)
    results[block] = (metrics_, per_user["ranks"], served)
  (dense, dense_ranks, dense_served), (blockwise, ranks, served) = results[0], results[7]
  np.testing.assert_array_equal(ranks, dense_ranks)
  for name in metrics.RESULT_KEYS:
    assert blockwise[name] == pytest.approx(dense[name], abs=1e-12), name
  assert served["item"].to_list() == dense_served["item"].to_list()
  np.testing.assert_allclose(served["score"].to_numpy(), dense_served["score"].to_numpy(),
                             rtol=1e-5)


def _alias_distribution(keep, alias):
  """The exact distribution an alias table draws from [K]: slot j uniform, j kept with
  probability keep[j], alias[j] otherwise."""
  keep = np.asarray(keep, np.float64)
  return (keep + np.bincount(alias, weights=1.0 - keep, minlength=keep.shape[0])) / keep.size


@pytest.mark.parametrize("weights", [
    [0.0, 1.0, 1.0, 1.0],             # uniform over items 1..3, padding never drawn
    [0.0, 5.0, 1.0, 0.0, 2.0],        # an item of weight 0 is never drawn
    [0.0, 1e-9, 1.0, 1e6],            # weights 15 orders of magnitude apart
    [3.0],                            # one item
    [0.0] + [0.5 + k % 7 for k in range(1000)],
])
def test_alias_table_draws_exactly_q(weights):
  keep, alias = sampled_softmax.alias_table(weights)
  q = np.asarray(weights) / np.sum(weights)
  implied = _alias_distribution(keep, alias)
  np.testing.assert_allclose(implied, q, rtol=0, atol=1e-7 / len(weights) + 1e-12)
  assert np.all(implied[q == 0] == 0)


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -1.0], [1.0, np.inf], [[1.0]]])
def test_alias_table_refuses_bad_weights(weights):
  with pytest.raises(ValueError, match="finite weights"):
    sampled_softmax.alias_table(weights)


@pytest.mark.parametrize("sampler", sampled_softmax.NEGATIVE_SAMPLERS)
def test_drawn_negatives_follow_q_and_skip_padding(sampler):
  """200k draws in one jitted call: each item's frequency within 5 standard errors of q."""
  counts = np.array([0] + [1 + (k * 37) % 11 for k in range(40)], np.float64)
  log_q, log_p = sampled_softmax.sampling_distributions(counts, sampler)
  sampled = sampled_softmax.make(200_000, log_q, log_p)
  drawn = np.asarray(jax.jit(lambda key: sampled_softmax.draw_negatives(key, sampled))(
      jax.random.key(3)))
  frequency = np.bincount(drawn, minlength=counts.size) / drawn.size
  q = np.exp(np.asarray(log_q, np.float64))
  assert frequency[0] == 0
  assert np.all(np.abs(frequency - q) <= 5 * np.sqrt(q * (1 - q) / drawn.size) + 1e-12)


def test_drawing_negatives_does_not_grow_with_the_catalog():
  """M = 1024 draws from N = 10^6 items: temporaries of O(M), not the [M, N] of Gumbel-max
  sampling (jax.random.categorical: 4 GB here, and 0.5 s a step already at N = 12k)."""
  log_q, log_p = sampled_softmax.sampling_distributions(np.ones(1_000_001), "uniform")
  sampled = sampled_softmax.make(1024, log_q, log_p)
  compiled = jax.jit(lambda key: sampled_softmax.draw_negatives(key, sampled)).lower(
      jax.random.key(0)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 1024 * 64


@pytest.mark.parametrize("sampler", sampled_softmax.NEGATIVE_SAMPLERS)
def test_sampled_softmax_tends_to_the_full_cross_entropy(sampler):
  x, table, targets, history = _problem(seed=5)
  counts = np.bincount(np.asarray(history).ravel(), minlength=NUM_ITEMS + 1) + 1
  log_q, log_p = sampled_softmax.sampling_distributions(counts, sampler)
  full = catalog.cross_entropy(x[0], table, targets, catalog.Spec(NUM_ITEMS, 8))
  in_batch = targets
  estimates = []
  for negatives in (4, 200_000):
    sampled = sampled_softmax.make(negatives, log_q, log_p)
    estimates.append(sampled_softmax.sampled_cross_entropy(x[0], table, targets, in_batch,
                                                   jax.random.key(0), sampled))
  np.testing.assert_allclose(estimates[1], full, rtol=0.01)  # Consistent: many samples.
  assert float(jnp.max(jnp.abs(estimates[0] - full))) > 0.01  # Few samples: an estimate.


def test_sampled_softmax_leaves_out_accidental_hits_and_padding():
  """Every candidate is the row's own target (in-batch copies, the one drawn negative) or
  padding: all are left out and only the exact own term remains, so the loss is 0."""
  x, table, targets, _ = _problem(seed=6)
  _, log_p = sampled_softmax.sampling_distributions(np.ones(NUM_ITEMS + 1), "uniform")
  only_target = jnp.full(NUM_ITEMS + 1, -jnp.inf).at[targets[0]].set(0.0)
  sampled = sampled_softmax.make(1, only_target, log_p)
  copies = jnp.array([targets[0], 0, targets[0]])
  loss = sampled_softmax.sampled_cross_entropy(x[0][:1], table, targets[:1], copies,
                                               jax.random.key(1), sampled)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["diffurec", "sasrec"])
def test_sampled_softmax_trains(synthetic_data, variant):
  """catalog.loss = 'sampled' runs the real training step: finite losses, moving parameters,
  near the full softmax's first loss (the same initial model)."""
  from diffurec_jax import data, sharding
  from diffurec_jax.training import state as train_state
  from helpers_train import tiny_config
  losses = {}
  for loss in ("full", "sampled"):
    config = tiny_config(synthetic_data, {"catalog.loss": loss, "catalog.negatives": 16},
                         preset=f"{variant},smoke")
    dataset = data.prepare(config.data)
    mesh = sharding.make_mesh()
    run = train_state.build_run(config, dataset, mesh)
    state = sharding.replicate(run.initial_state(), mesh)
    first = state.params["item_embedding"][...].copy()
    losses[loss] = []
    for plan in run.epoch_plan(1)[:3]:
      state, value = run.train_step(state, run.batch(plan), run.key, run.schedule)
      losses[loss].append(float(value))
    assert not np.allclose(state.params["item_embedding"][...], first)
  assert np.all(np.isfinite(losses["sampled"]))
  assert losses["sampled"] != losses["full"]
  assert losses["sampled"][0] == pytest.approx(losses["full"][0], rel=0.2)


def test_bad_catalog_settings_are_one_sentence_each():
  from diffurec_jax import config_check, errors, sharding
  from helpers_train import tiny_config
  config = tiny_config(changes={"catalog.block": -1, "catalog.shards": 0,
                                "catalog.loss": "nce", "catalog.negatives": 0,
                                "catalog.negative_sampler": "zipf"})
  with pytest.raises(errors.ConfigError) as raised:
    config_check.validate(config)
  for words in ("catalog.block=-1", "catalog.shards=0", "catalog.loss='nce'",
                "catalog.negatives=0", "catalog.negative_sampler='zipf'"):
    assert words in str(raised.value)
  with pytest.raises(errors.ConfigError, match="catalog.shards=3 does not divide the 1 devices"):
    sharding.make_mesh(3)
