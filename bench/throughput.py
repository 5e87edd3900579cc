"""Training and inference throughput on real data, after warm-up; ours, and the official code.

One process, our code (as before):
  python bench/throughput.py --config configs/beauty.py:diffurec [--steps 20] [--baseline] [--json]
prints a table and, as its last line, JSON with train_examples_per_s, infer_users_per_s,
infer_users_per_s_4seeds, compile_s, peak_rss_mb (plus the padded-baseline figures and their
ratios with --baseline: the same code with length buckets off, every history padded to
max_len, measured in the same process).

Side by side with the official PyTorch DiffuRec (torch: the optional `parity` extra):
  python bench/throughput.py --upstream PATH/TO/DiffuRec/src --rounds 2 \
      [--variants diffurec,v1,v2,sasrec] [--dataset beauty] [--markdown docs/performance.md]
Every round runs, per variant, our training and our inference each in a fresh process (so
each peak RSS is that part's own, and compilation starts cold), and for DiffuRec the official
code's training and inference (bench/upstream_throughput.py) at the same batch size, max_len
and evaluation batch; the order of ours and theirs alternates between rounds. Figures are
medians over rounds; ratios are ours / official of the medians. Without --upstream the same
table is printed with our figures only. No reference figure is hard-coded.
"""

import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from diffurec_jax.data import batches as batches_lib
from diffurec_jax import data as data_lib
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax import sharding
from diffurec_jax.training import state as train_state

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
_BARRIER = flags.DEFINE_string(
    "barrier", None, "DIR:N: after compiling, wait until N processes have reached DIR before "
    "timing (bench/pinned.py starts its concurrent children together this way).")

_PART = flags.DEFINE_enum("part", "all", ["all", "train", "infer"],
                          "all: one process as above; train / infer: that part alone (side by "
                          "side children).")
_UPSTREAM = flags.DEFINE_string("upstream", None, "The official code's folder: side by side.")
_SIDE = flags.DEFINE_bool("side_by_side", False, "The side-by-side table (implied by --upstream).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Side by side: rounds (medians are reported).")
_VARIANTS = flags.DEFINE_list("variants", ["diffurec", "v1", "v2", "sasrec"],
                              "Side by side: presets of configs/<dataset>.py to measure.")
_DATASET = flags.DEFINE_string("dataset", "beauty", "Side by side: configs/<dataset>.py.")
_USERS_4SEEDS = flags.DEFINE_integer("users_4seeds", 0, "Users of the 4-seed timing (0: --users).")
_FOUR_SEEDS = flags.DEFINE_bool("four_seeds", True, "--part infer: also time a 4-seed ensemble.")
_UPSTREAM_STEPS = flags.DEFINE_integer("upstream_steps", 10, "Official training steps timed.")
_UPSTREAM_USERS = flags.DEFINE_integer("upstream_users", 512, "Official inference users timed.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Side by side: write the table into this file "
                                "between its bench markers (docs/performance.md).")


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


def wait_at_barrier(spec: str | None):
  """Marks this process as ready in DIR and waits until N are (spec 'DIR:N'; None: no wait)."""
  if not spec:
    return
  folder, count = spec.rsplit(":", 1)
  open(os.path.join(folder, f"ready.{os.getpid()}"), "w").close()
  while sum(name.startswith("ready.") for name in os.listdir(folder)) < int(count):
    time.sleep(0.02)


def device_bytes(jitted, *args) -> int:
  """Bytes one device holds for one call: XLA's arguments + temporaries of the compiled
  program (per device after partitioning; outputs alias the donated arguments)."""
  memory = jitted.lower(*args).compile().memory_analysis()
  return int(memory.argument_size_in_bytes + memory.temp_size_in_bytes)


def train_throughput(config, dataset, mesh, steps, repeats):
  """(examples/s median, compile seconds, bundle, GFLOP/s achieved, bytes per device of the
  longest bucket's step) over real batches."""
  run = train_state.build_run(config, dataset, mesh)
  plans = run.epoch_plan(1)
  bundle, step, schedule = run.bundle, run.train_step, run.schedule
  state = sharding.replicate(run.initial_state(), mesh)
  key = jax.random.key(0)
  build = run.batch
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
  longest = max(plans, key=lambda plan: plan.length)
  memory = device_bytes(step, state, build(longest), key, schedule)
  wait_at_barrier(_BARRIER.value)
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
  return (statistics.median(rates), compile_s, bundle_lib.Bundle(bundle.graphdef, state.params),
          statistics.median(gflops), memory)


def infer_throughput(config, dataset, mesh, bundle, num_users, repeats):
  """(users/s median, compile seconds) of full-ranking evaluation of random test users.

  Batches are built and placed before the clock starts; compile_s is the first call of each
  batch shape (cold unless a persistent compilation cache is configured).
  """
  evaluator = evaluate_lib.Evaluator(config, dataset, mesh)
  subset = evaluator.examples("test", num_users, subset_seed=0)
  step, schedule, key = evaluator.step, evaluator.schedule, jax.random.key(0)
  batches = [batch for _, batch in evaluator.batches(subset)]
  first_of_shape = {b["history"].shape: b for b in reversed(batches)}.values()
  compile_s = sum(_time(lambda b=b: step(bundle, b, key, schedule)) for b in first_of_shape)
  seconds = [_time(lambda: [step(bundle, b, key, schedule) for b in batches])
             for _ in range(repeats)]
  return num_users / statistics.median(seconds), compile_s


def infer_device_bytes(config, dataset, mesh, bundle, num_users: int) -> int:
  """Bytes one device holds for the evaluation step of the longest histories' batch."""
  evaluator = evaluate_lib.Evaluator(config, dataset, mesh)
  subset = evaluator.examples("test", num_users, subset_seed=0)
  longest = max((batch for _, batch in evaluator.batches(subset)),
                key=lambda batch: batch["history"].shape[1])
  return device_bytes(evaluator.step, bundle, longest, jax.random.key(0), evaluator.schedule)


def measure(config, mesh, dataset, steps, users, repeats, label=""):
  train_rate, train_compile, bundle, train_gflops, _ = train_throughput(config, dataset, mesh,
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


def _header(config) -> dict:
  return {"dataset": config.data.name, "variant": config.variant,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "batch_size": config.train.batch_size, "max_len": config.data.max_len,
          "eval_batch_size": config.train.eval_batch_size,
          "hidden": config.model.hidden, "num_blocks": config.model.num_blocks,
          "diffusion_steps": config.model.diffusion_steps,
          "sample_steps": config.sample.steps or config.model.diffusion_steps,
          "length_buckets": list(batches_lib.bucket_config(config))}


def _peak_rss_mb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def part_train(config, mesh, dataset) -> dict:
  """The training step alone (a side-by-side child): speed, compile seconds, peak RSS."""
  rate, compile_s, _, gflops, memory = train_throughput(config, dataset, mesh, _STEPS.value,
                                                        _REPEATS.value)
  return {"train_examples_per_s": round(rate, 1), "train_gflops_per_s": round(gflops, 1),
          "train_compile_s": round(compile_s, 1), "train_peak_rss_mb": _peak_rss_mb(),
          "train_device_mb": round(memory / 2**20, 1)}


def part_infer(config, mesh, dataset) -> dict:
  """Inference alone, freshly initialised weights (a side-by-side child): the configured
  sampler, one reverse step and a 4-seed ensemble; speed, compile seconds, peak RSS."""
  bundle = train_state.init_model(config, dataset.num_items)
  bundle = bundle_lib.Bundle(bundle.graphdef, sharding.replicate(bundle.params, mesh))
  users, repeats = _USERS.value, _REPEATS.value
  rate, compile_s = infer_throughput(config, dataset, mesh, bundle, users, repeats)
  result = {"infer_users_per_s": round(rate, 1), "infer_compile_s": round(compile_s, 1),
            "infer_device_mb": round(infer_device_bytes(config, dataset, mesh, bundle, users)
                                     / 2**20, 1)}
  if config.variant != "sasrec":  # SASRec has no reverse chain: one forward is its inference.
    one = config.copy_and_resolve_references()
    one.sample.steps = 1
    rate1, compile1 = infer_throughput(one, dataset, mesh, bundle, users, repeats)
    rate4, compile4 = None, 0.0
    if _FOUR_SEEDS.value:
      seeds4 = config.copy_and_resolve_references()
      seeds4.sample.seeds = 4  # A quarter of the users per batch: the same chains per batch.
      seeds4.train.eval_batch_size = max(config.train.eval_batch_size // 4, 1)
      rate4, compile4 = infer_throughput(seeds4, dataset, mesh, bundle,
                                         _USERS_4SEEDS.value or users, repeats)
      rate4 = round(rate4, 1)
    result.update({"infer_users_per_s_1step": round(rate1, 1),
                   "infer_users_per_s_4seeds": rate4,
                   "infer_compile_s": round(compile_s + compile1 + compile4, 1)})
  result["infer_peak_rss_mb"] = _peak_rss_mb()
  return result


def main(argv):
  del argv
  if _UPSTREAM.value or _SIDE.value:
    import side_by_side  # bench/
    side_by_side.run(side_by_side.Options(
        upstream=_UPSTREAM.value, rounds=_ROUNDS.value, variants=tuple(_VARIANTS.value),
        dataset=_DATASET.value, steps=_STEPS.value, users=_USERS.value,
        users_4seeds=_USERS_4SEEDS.value, eval_batch_size=_EVAL_BATCH.value,
        upstream_steps=_UPSTREAM_STEPS.value, upstream_users=_UPSTREAM_USERS.value,
        markdown=_MARKDOWN.value))
    return
  config = _CONFIG.value
  config.train.eval_batch_size = _EVAL_BATCH.value
  jax.config.update("jax_enable_compilation_cache", False)  # Compile seconds are cold.
  mesh = sharding.make_mesh(config.catalog.shards)
  dataset = data_lib.prepare(config.data)
  result = _header(config)
  if _PART.value != "all":
    result["part"] = _PART.value
    result.update((part_train if _PART.value == "train" else part_infer)(config, mesh, dataset))
    print(json.dumps(result), flush=True)
    return
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
  result["peak_rss_mb"] = _peak_rss_mb()
  result["ratio_4seeds_cost"] = round(result["infer_users_per_s"]
                                      / result["infer_users_per_s_4seeds"], 2)
  if not _JSON.value:
    width = max(len(k) for k in result)
    for k, v in result.items():
      print(f"{k:<{width}}  {v}")
    print("(against the official code: bench/throughput.py --upstream PATH, measured side by side)")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
