"""Training and inference throughput on real data, after warm-up, median of repeats.

  python bench/throughput.py --config configs/beauty.py:diffurec [--steps 20] [--baseline] [--json]

Prints a table and, as its last line, JSON with train_examples_per_s, infer_users_per_s,
infer_users_per_s_4seeds, compile_s, peak_rss_mb (plus the padded-baseline figures and their
ratios with --baseline: the same code with length buckets off, every history padded to
max_len, measured in the same process). The official PyTorch DiffuRec figures on this kind
of machine (92 training examples/s, 8.8 users/s; issue 6) are printed as labelled references.
"""

import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffurec_jax import batches as batches_lib
from diffurec_jax import data as data_lib
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax import model as model_lib
from diffurec_jax import sample
from diffurec_jax import schedule as schedule_lib
from diffurec_jax import sharding
from diffurec_jax import train as train_lib
from diffurec_jax.data import splits

_CONFIG = config_flags.DEFINE_config_file("config", "configs/beauty.py:diffurec", "Config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps per repeat.")
_USERS = flags.DEFINE_integer("users", 2048, "Test users per inference repeat.")
_EVAL_BATCH = flags.DEFINE_integer(
    "eval_batch_size", 256, "Users per inference batch; keep it well below --users / number "
    "of buckets, or the padded rows of partial batches dominate the timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
_BASELINE = flags.DEFINE_bool("baseline", False, "Also time the padded path (no buckets).")
_BASELINE_STEPS = flags.DEFINE_integer("baseline_steps", 4, "Training steps per baseline repeat.")
_BASELINE_USERS = flags.DEFINE_integer("baseline_users", 128, "Users per baseline repeat.")
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON line.")

PYTORCH_TRAIN_EXAMPLES_PER_S = 92.0  # Official DiffuRec, same kind of machine (issue 6).
PYTORCH_INFER_USERS_PER_S = 8.8


def _time(function) -> float:
  start = time.perf_counter()
  jax.block_until_ready(function())
  return time.perf_counter() - start


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
  """The machine's float32 matmul ceiling through XLA, in GFLOP/s (median)."""
  a = jax.random.normal(jax.random.key(0), (size, size))
  b = jax.random.normal(jax.random.key(1), (size, size))
  product = jax.jit(jnp.matmul)
  jax.block_until_ready(product(a, b))
  return 2 * size**3 / statistics.median(_time(lambda: product(a, b))
                                         for _ in range(repeats)) / 1e9


def step_flops(jitted, *args) -> float:
  """XLA's count of floating-point operations of one call."""
  analysis = jitted.lower(*args).cost_analysis()  # From the HLO: no second compilation.
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", 0.0))


def train_throughput(config, dataset, mesh, steps, repeats):
  """(examples/s median, compile seconds, bundle, GFLOP/s achieved) over real batches."""
  examples, loss_fn, next_items = train_lib.training_setup(config, dataset)
  lengths = batches_lib.bucket_lengths(config.data.max_len, evaluate_lib.bucket_config(config))
  history_lengths = (examples.ends - examples.starts).astype(np.int64)
  plans = batches_lib.epoch_plan(history_lengths, config.train.batch_size, lengths, 0, 1)
  tx = train_lib.make_optimizer(config.train, len(plans))
  bundle = train_lib.init_model(config, dataset.num_items)
  state = sharding.replicate(
      train_lib.TrainState(bundle.params, tx.init(bundle.params), jnp.zeros((), jnp.int32)), mesh)
  step = train_lib.make_train_step(loss_fn, bundle.graphdef, tx)
  schedule = schedule_lib.make_schedule(config.model.schedule, config.model.diffusion_steps)
  key = jax.random.key(0)
  build = lambda plan: sharding.shard_batch(
      batches_lib.build(plan, examples, dataset.items, next_items=next_items), mesh)
  compile_s, seen = 0.0, set()
  for plan in plans:
    if plan.length not in seen:
      seen.add(plan.length)
      start = time.perf_counter()
      state, loss = step(state, build(plan), key, schedule)
      jax.block_until_ready(loss)
      compile_s += time.perf_counter() - start
  flops_of = {}
  for plan in plans:
    if plan.length not in flops_of:
      flops_of[plan.length] = step_flops(step, state, build(plan), key, schedule)
  rates, gflops = [], []
  for repeat in range(repeats):
    chosen = plans[repeat * steps:(repeat + 1) * steps]
    count = sum(int((plan.indices >= 0).sum()) for plan in chosen)
    start = time.perf_counter()
    for plan in chosen:
      state, loss = step(state, build(plan), key, schedule)
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    rates.append(count / seconds)
    gflops.append(sum(flops_of[plan.length] for plan in chosen) / seconds / 1e9)
  return (statistics.median(rates), compile_s, model_lib.Bundle(bundle.graphdef, state.params),
          statistics.median(gflops))


def infer_throughput(config, dataset, mesh, bundle, num_users, repeats):
  """(users/s median, compile seconds) of full-ranking evaluation of random test users."""
  examples = splits.eval_examples(dataset, "test")
  chosen = np.sort(np.random.default_rng(0).choice(len(examples.users), num_users,
                                                   replace=False))
  subset = splits.Examples(users=examples.users[chosen], starts=examples.starts[chosen],
                           ends=examples.ends[chosen], targets=examples.targets[chosen])
  lengths = batches_lib.bucket_lengths(config.data.max_len, evaluate_lib.bucket_config(config))
  plans = batches_lib.eval_plan((subset.ends - subset.starts).astype(np.int64),
                                config.train.eval_batch_size, lengths)
  step = evaluate_lib.make_eval_step(config)
  schedule = sample.sampling_schedule(config)
  key = jax.random.key(0)
  batches = [sharding.shard_batch(batches_lib.build(plan, subset, dataset.items), mesh)
             for plan in plans]
  first_of_shape = {b["history"].shape: b for b in reversed(batches)}.values()
  compile_s = sum(_time(lambda b=b: step(bundle, b, key, schedule)) for b in first_of_shape)
  seconds = [_time(lambda: [step(bundle, b, key, schedule) for b in batches])
             for _ in range(repeats)]
  return num_users / statistics.median(seconds), compile_s


def measure(config, mesh, dataset, steps, users, repeats, label=""):
  train_rate, train_compile, bundle, train_gflops = train_throughput(config, dataset, mesh,
                                                                    steps, repeats)
  _progress(f"{label}train_examples_per_s", round(train_rate, 1))
  infer_rate, infer_compile = infer_throughput(config, dataset, mesh, bundle, users, repeats)
  _progress(f"{label}infer_users_per_s", round(infer_rate, 1))
  config4 = config.copy_and_resolve_references()
  config4.sample.seeds = 4
  infer4_rate, infer4_compile = infer_throughput(config4, dataset, mesh, bundle, users, repeats)
  _progress(f"{label}infer_users_per_s_4seeds", round(infer4_rate, 1))
  return {"train_examples_per_s": round(train_rate, 1),
          "train_gflops_per_s": round(train_gflops, 1),
          "infer_users_per_s": round(infer_rate, 1),
          "infer_users_per_s_4seeds": round(infer4_rate, 1),
          "compile_s": round(train_compile + infer_compile + infer4_compile, 1)}


def _progress(name, value):
  print(f"# {name}: {value}", file=sys.stderr, flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  config.train.eval_batch_size = _EVAL_BATCH.value
  mesh = sharding.make_mesh()
  dataset = data_lib.prepare(config.data)
  result = {"dataset": config.data.name, "variant": config.variant,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "batch_size": config.train.batch_size, "max_len": config.data.max_len,
            "hidden": config.model.hidden, "num_blocks": config.model.num_blocks,
            "diffusion_steps": config.model.diffusion_steps,
            "sample_steps": config.sample.steps or config.model.diffusion_steps,
            "length_buckets": list(evaluate_lib.bucket_config(config))}
  result["matmul_gflops_per_s"] = round(matmul_gflops(), 1)
  result.update(measure(config, mesh, dataset, _STEPS.value, _USERS.value, _REPEATS.value))
  if _BASELINE.value:
    padded = config.copy_and_resolve_references()
    padded.train.length_buckets = ()
    base = measure(padded, mesh, dataset, _BASELINE_STEPS.value, _BASELINE_USERS.value,
                   _REPEATS.value, label="padded_")
    result.update({f"padded_{k}": v for k, v in base.items()})
    for k in ("train_examples_per_s", "infer_users_per_s", "infer_users_per_s_4seeds"):
      result[f"speedup_vs_padded_{k}"] = round(result[k] / base[k], 2)
  result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  result["ratio_4seeds_cost"] = round(result["infer_users_per_s"]
                                      / result["infer_users_per_s_4seeds"], 2)
  result["vs_pytorch_train"] = round(result["train_examples_per_s"]
                                     / PYTORCH_TRAIN_EXAMPLES_PER_S, 1)
  result["vs_pytorch_infer"] = round(result["infer_users_per_s"] / PYTORCH_INFER_USERS_PER_S, 1)
  if not _JSON.value:
    width = max(len(k) for k in result)
    for k, v in result.items():
      print(f"{k:<{width}}  {v}")
    print("(vs_pytorch_*: ratios to the official PyTorch DiffuRec figures of issue 6, "
          "92 ex/s and 8.8 users/s on this kind of 2-core machine; not measured in this run)")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
