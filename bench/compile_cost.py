"""Where compilation time and memory go: one (function, bucket length) per fresh process.

  python bench/compile_cost.py --config configs/beauty.py:v1 [--parts train,eval,eval4]

For every length bucket and every part (the training step; the evaluation step with the
configured sampler; the same with a 4-seed ensemble) a child process lowers and compiles that
one function at that one shape and reports: lowering seconds, XLA compile seconds, the size of
the optimised HLO (instructions, and how many are fusions / while loops / dots), the peak RSS
of the process and how much compilation added to it, and the first run's seconds. Prints a
table and a JSON line. `--length L --part P` runs one cell in this process.
"""

import json
import re
import resource
import subprocess
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from diffurec_jax.data import batches as batches_lib
from diffurec_jax import data as data_lib
from diffurec_jax import evaluate as evaluate_lib
from diffurec_jax import sharding
from diffurec_jax.training import state as train_state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/beauty.py:diffurec", "Config.")
_PARTS = flags.DEFINE_list("parts", ["train", "eval", "eval4"], "Functions to compile.")
_PART = flags.DEFINE_string("part", None, "One part, in this process (child mode).")
_LENGTH = flags.DEFINE_integer("length", None, "One bucket length, in this process.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 256, "Users per evaluation batch.")
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON line.")


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hlo_summary(text: str) -> dict:
  """Instruction counts of an optimised HLO module's text."""
  lines = [line for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//")]
  count = lambda pattern: sum(1 for line in lines if re.search(pattern, line))
  return {"hlo_instructions": len(lines), "hlo_fusions": count(r"\bfusion\("),
          "hlo_while": count(r"\bwhile\("), "hlo_dots": count(r"\bdot\("),
          "hlo_kb": round(len(text) / 1024, 1)}


def _compile(jitted, *args) -> dict:
  """Lower, compile and run once; seconds, HLO size and memory."""
  rss_before = _rss_mb()
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  run_s = time.perf_counter() - start
  result = {"lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
            "first_run_s": round(run_s, 2), "rss_before_mb": round(rss_before, 1),
            "peak_rss_mb": round(_rss_mb(), 1)}
  result.update(hlo_summary(compiled.as_text()))
  return result


def one_cell(config, part: str, length: int) -> dict:
  """Compile `part` at bucket `length` in this process."""
  mesh = sharding.make_mesh()
  dataset = data_lib.prepare(config.data)
  key = jax.random.key(0)
  if part == "train":
    run = train_state.build_run(config, dataset, mesh)
    plan = next(p for p in run.epoch_plan(1) if p.length == length)
    state = sharding.replicate(run.initial_state(), mesh)
    return _compile(run.train_step, state, run.batch(plan), key, run.schedule)
  config = config.copy_and_resolve_references()
  config.train.eval_batch_size = _EVAL_BATCH.value
  if part == "eval4":
    config.sample.seeds = 4
  evaluator = evaluate_lib.Evaluator(config, dataset, mesh)
  examples = evaluator.examples("test")
  plan = next(p for p in evaluator.plans(examples) if p.length == length)
  bundle = train_state.init_model(config, dataset.num_items)
  return _compile(evaluator.step, bundle, evaluator.batch(plan, examples), key,
                  evaluator.schedule)


def _child(part: str, length: int) -> dict:
  argv = [sys.executable, __file__, f"--part={part}", f"--length={length}", "--json",
          f"--eval_batch_size={_EVAL_BATCH.value}"]
  argv += [arg for arg in sys.argv[1:] if arg.startswith("--config")]
  done = subprocess.run(argv, capture_output=True, text=True)
  if done.returncode:
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  config = _CONFIG.value
  if _PART.value:
    print(json.dumps(one_cell(config, _PART.value, _LENGTH.value)), flush=True)
    return
  lengths = batches_lib.padded_lengths(config)
  rows = []
  for part in _PARTS.value:
    for length in lengths:
      row = {"part": part, "length": length, **_child(part, length)}
      rows.append(row)
      if not _JSON.value:
        print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
  summary = {"variant": config.variant, "batch_size": config.train.batch_size,
             "max_len": config.data.max_len, "eval_batch_size": _EVAL_BATCH.value,
             "compile_s_total": round(sum(r.get("lower_s", 0) + r.get("compile_s", 0)
                                          for r in rows), 1),
             "peak_rss_mb_max": max(r.get("peak_rss_mb", 0) for r in rows), "cells": rows}
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main)
