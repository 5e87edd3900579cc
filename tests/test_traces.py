"""Nothing recompiles: the train step traces once per bucket shape (chex.assert_max_traces)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax import config as config_lib
from diffurec_jax.data import batches
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax import diffusion as schedule_lib
from diffurec_jax.training import state as train_state
from diffurec_jax.training import optimizer as optimizer_lib
from diffurec_jax.data import splits

NUM_ITEMS = 30


def _config():
  config = config_lib.apply_presets(config_lib.base_config(), "diffurec")
  config.model.hidden, config.model.num_blocks, config.model.num_heads = 8, 1, 1
  config.model.dropout = config.model.emb_dropout = 0.0
  config.data.max_len = 8
  return config


def _examples():
  rng = np.random.default_rng(0)
  items = rng.integers(1, NUM_ITEMS + 1, size=200).astype(np.int32)
  starts = np.arange(0, 180, 9, dtype=np.int64)
  ends = starts + rng.integers(1, 9, size=len(starts))
  return items, splits.Examples(users=np.arange(len(starts), dtype=np.int32), starts=starts,
                                ends=ends, targets=items[ends])


@pytest.mark.slow
def test_train_step_traces_once_per_shape():
  config = _config()
  items, examples = _examples()
  noise = (config.offset_noise.mode, config.offset_noise.delta_c, config.offset_noise.scale)
  chex.clear_trace_counter()
  counted = chex.assert_max_traces(
      lambda params, graphdef, batch, rng, schedule: model_lib.diffusion_loss(
          params, graphdef, batch, rng, schedule, noise), n=2)
  bundle = train_state.init_model(config, NUM_ITEMS)
  tx = optimizer_lib.make_optimizer(config.train, 10)
  state = train_state.TrainState(bundle.params, tx.init(bundle.params), jnp.zeros((), jnp.int32))
  step = train_state.make_train_step(counted, bundle.graphdef, tx)
  schedule = schedule_lib.make_schedule("trunc_lin", 32)
  key = jax.random.key(0)
  plans = [batches.Plan(length, np.arange(4) + 4 * k) for k, length in enumerate((4, 4, 8, 8, 4))]
  for plan in plans:  # Two shapes, five calls: two traces.
    state, loss = step(state, batches.build(plan, examples, items), key, schedule)
    assert np.isfinite(float(loss))
  with pytest.raises(AssertionError, match="traced > 2"):
    step(state, batches.build(batches.Plan(6, np.arange(4)), examples, items), key, schedule)
