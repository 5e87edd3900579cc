"""Data parallelism on fake CPU devices: sharded training and evaluation equal one device.

The device count is fixed when jax starts (XLA_FLAGS), so every run is a subprocess.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import helpers_train as helpers

pytestmark = pytest.mark.slow

# Trains the first steps of epoch 1 on all devices with the library's own pieces, then
# validates; writes losses, validation metrics, shardings and the final parameters.
_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from diffurec_jax import data, evaluate, sharding
from diffurec_jax.data import batches
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model
from diffurec_jax import diffusion as schedule
from diffurec_jax.training import loop as train
from diffurec_jax.training import state as train_state
from diffurec_jax.training import optimizer as optimizer_lib

config_path, out = sys.argv[1], sys.argv[2]
with open(config_path) as f:
  config = ml_collections.ConfigDict(json.load(f))
dataset = data.prepare(config.data)
examples, loss_fn, next_items = train_state.training_setup(config, dataset)
lengths = batches.bucket_lengths(config.data.max_len, evaluate.bucket_config(config))
plans = batches.epoch_plan((examples.ends - examples.starts).astype(np.int64),
                           config.train.batch_size, lengths, config.seed, 1,
                           config.train.max_steps_per_epoch)
tx = optimizer_lib.make_optimizer(config.train, len(plans))
bundle = train_state.init_model(config, dataset.num_items)
mesh = sharding.make_mesh()
sharding.check_batch_size(config.train.batch_size, mesh)
state = sharding.replicate(
    train_state.TrainState(bundle.params, tx.init(bundle.params), jnp.zeros((), jnp.int32)), mesh)
diffusion = schedule.make_schedule(config.model.schedule, config.model.diffusion_steps)
step = train_state.make_train_step(loss_fn, bundle.graphdef, tx, **train_state.step_options(config))
key = jax.random.fold_in(jax.random.key(config.seed), 1)
losses = []
for plan in plans:
  batch = sharding.shard_batch(
      batches.build(plan, examples, dataset.items, next_items=next_items), mesh)
  state, loss = step(state, batch, key, diffusion)
  losses.append(float(loss))
valid, _ = evaluate.evaluate_split(bundle_lib.Bundle(bundle.graphdef, state.params), dataset,
                                   "valid", config, mesh, progress=False)
paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state.params))
np.savez(out + ".npz", *[np.asarray(leaf) for leaf in leaves])
with open(out + ".json", "w") as f:
  json.dump({"devices": jax.device_count(), "losses": losses, "valid": valid,
             "names": [jax.tree_util.keystr(path) for path in paths],
             "batch_shards": len(batch["history"].addressable_shards),
             "params_replicated": all(leaf.sharding.is_fully_replicated for leaf in leaves)}, f)
"""


def _env(devices: int) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
          "JAX_PLATFORMS": "cpu"}


def test_four_devices_match_one(data_root, tmp_path):
  config = helpers.tiny_config(data_root, {"train.max_steps_per_epoch": 3})
  (tmp_path / "config.json").write_text(config.to_json())
  processes = {}
  for devices in (1, 4):  # Both at once: the two compilations share the 2 cores.
    env = dict(os.environ, DIFFUREC_DATA=str(data_root), **helpers.COMPILATION_CACHE_ENV,
               **_env(devices))
    processes[devices] = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "config.json"),
         str(tmp_path / f"run{devices}")], cwd=helpers.REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  runs = {}
  for devices, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    report = json.loads((tmp_path / f"run{devices}.json").read_text())
    with np.load(tmp_path / f"run{devices}.npz") as saved:
      report["params"] = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    runs[devices] = report
  one, four = runs[1], runs[4]
  assert (one["devices"], four["devices"]) == (1, 4)
  assert (one["batch_shards"], four["batch_shards"]) == (1, 4)
  assert one["params_replicated"] and four["params_replicated"]

  assert len(one["losses"]) == 3
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-4)
  assert four["names"] == one["names"]
  compared = 0
  for name, sharded, single in zip(one["names"], four["params"], one["params"]):
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6, err_msg=name)
    compared += 1
  assert compared == len(one["names"]) > 0
  for name in helpers.RESULT_KEYS:
    assert four["valid"][name] == pytest.approx(one["valid"][name], abs=1e-6), name


def test_batch_not_divisible_by_devices(data_root, tmp_path):
  helpers.require_toys(data_root)
  result = helpers.run_bin("train.py", *helpers.cli_flags({"train.batch_size": 30}),
                           "--workdir", str(tmp_path / "run"), data_root=data_root,
                           env=_env(4))
  helpers.assert_user_error(result, "train.batch_size=30", "4 devices")
