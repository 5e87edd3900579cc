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
from helpers_train import synthetic_data  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

# Trains the first steps of epoch 1 on all devices with the library's own pieces, then
# validates; writes losses, validation metrics, shardings and the final parameters.
_SCRIPT = r"""
import json, sys
import jax, ml_collections, numpy as np
from diffurec_jax import data, evaluate, sharding
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.training import state as train_state

config_path, out = sys.argv[1], sys.argv[2]
with open(config_path) as f:
  config = ml_collections.ConfigDict(json.load(f))
dataset = data.prepare(config.data)
mesh = sharding.make_mesh(config.catalog.shards)
run = train_state.build_run(config, dataset, mesh)
state = sharding.replicate(run.initial_state(), mesh)
losses = []
for plan in run.epoch_plan(1):
  batch = run.batch(plan)
  state, loss = run.train_step(state, batch, run.key, run.schedule)
  losses.append(float(loss))
valid, _ = evaluate.Evaluator(config, dataset, mesh).evaluate(
    bundle_lib.Bundle(run.bundle.graphdef, state.params), "valid", progress=False)
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


def _run_each(configs: dict, tmp_path, data_root) -> dict:
  """{name: report} of the script under each (devices, config), all started at once (the
  compilations share the 2 cores)."""
  processes = {}
  for name, (devices, config) in configs.items():
    (tmp_path / f"{name}.config.json").write_text(config.to_json())
    env = dict(os.environ, DIFFUREC_DATA=str(data_root), **helpers.COMPILATION_CACHE_ENV,
               **_env(devices))
    processes[name] = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / f"{name}.config.json"),
         str(tmp_path / name)], cwd=helpers.REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  runs = {}
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    report = json.loads((tmp_path / f"{name}.json").read_text())
    with np.load(tmp_path / f"{name}.npz") as saved:
      report["params"] = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    runs[name] = report
  return runs


def _assert_same_training(one, other, num_items: int = 0):
  assert len(one["losses"]) == 3
  np.testing.assert_allclose(other["losses"], one["losses"], rtol=1e-4)
  assert other["names"] == one["names"]
  compared = 0
  for name, sharded, single in zip(one["names"], other["params"], one["params"]):
    if sharded.shape != single.shape:  # A sharded item table: zero padding rows after N.
      np.testing.assert_array_equal(sharded[num_items + 1:], 0.0)
      sharded = sharded[:num_items + 1]
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6, err_msg=name)
    compared += 1
  assert compared == len(one["names"]) > 0
  for name in helpers.RESULT_KEYS:
    assert other["valid"][name] == pytest.approx(one["valid"][name], abs=1e-6), name


def test_four_devices_match_one(synthetic_data, tmp_path):
  config = helpers.tiny_config(synthetic_data, {"train.max_steps_per_epoch": 3})
  runs = _run_each({"one": (1, config), "four": (4, config)}, tmp_path, synthetic_data)
  one, four = runs["one"], runs["four"]
  assert (one["devices"], four["devices"]) == (1, 4)
  assert (one["batch_shards"], four["batch_shards"]) == (1, 4)
  assert one["params_replicated"] and four["params_replicated"]
  _assert_same_training(one, four)


def test_item_sharded_blockwise_training_matches_dense(synthetic_data, tmp_path):
  """The item table's rows over 2 of 4 devices, scored in blocks: the same run as dense."""
  dense = helpers.tiny_config(synthetic_data, {"train.max_steps_per_epoch": 3})
  sharded = helpers.tiny_config(synthetic_data, {"train.max_steps_per_epoch": 3,
                                                 "catalog.shards": 2, "catalog.block": 16})
  runs = _run_each({"dense": (1, dense), "sharded": (4, sharded)}, tmp_path, synthetic_data)
  assert runs["sharded"]["batch_shards"] == 4 and not runs["sharded"]["params_replicated"]
  from diffurec_jax import data
  _assert_same_training(runs["dense"], runs["sharded"], data.prepare(dense.data).num_items)


def test_batch_not_divisible_by_devices(synthetic_data, tmp_path):
  result = helpers.run_bin("train.py", *helpers.cli_flags({"train.batch_size": 30}),
                           "--workdir", str(tmp_path / "run"), data_root=synthetic_data,
                           env=_env(4), separate_process=True)
  helpers.assert_user_error(result, "train.batch_size=30", "4 devices")
