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
mesh = sharding.make_mesh()
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


def test_four_devices_match_one(synthetic_data, tmp_path):
  config = helpers.tiny_config(synthetic_data, {"train.max_steps_per_epoch": 3})
  (tmp_path / "config.json").write_text(config.to_json())
  processes = {}
  for devices in (1, 4):  # Both at once: the two compilations share the 2 cores.
    env = dict(os.environ, DIFFUREC_DATA=str(synthetic_data), **helpers.COMPILATION_CACHE_ENV,
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


def test_batch_not_divisible_by_devices(synthetic_data, tmp_path):
  result = helpers.run_bin("train.py", *helpers.cli_flags({"train.batch_size": 30}),
                           "--workdir", str(tmp_path / "run"), data_root=synthetic_data,
                           env=_env(4), separate_process=True)
  helpers.assert_user_error(result, "train.batch_size=30", "4 devices")
