"""Serve a trained workdir.

  python bin/infer.py --workdir W                      # test metrics of the best checkpoint (JSON last line)
  python bin/infer.py --workdir W --input h.csv --output recs.csv --topk 10

Recommendation columns: user, rank, item, score, error (error is set only on the one row of
a user none of whose items the model knows). History items are excluded unless
--noexclude_history.
"""

import json
import sys

from absl import flags

from diffurec_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir trained by bin/train.py.")
_INPUT = flags.DEFINE_string("input", None, "CSV/TSV/parquet (user,item[,timestamp]) or JSONL "
                             "({'user':..,'items':[..]}) histories in ORIGINAL ids.")
_OUTPUT = flags.DEFINE_string("output", None, "Recommendations: .csv, .tsv (.tab) or .parquet; "
                              "its folder must exist.")
_TOPK = flags.DEFINE_integer("topk", 10, "Recommendations per user (1 to the number of items).")
_EXCLUDE = flags.DEFINE_bool(
    "exclude_history", True, "Never recommend an item of the user's own history "
    "(--noexclude_history allows it). Test metrics (no --input) keep the run's protocol.")
_SEEDS = flags.DEFINE_integer("seeds", 0, "Ensemble size (0 = the run's config).")
_STEPS = flags.DEFINE_integer("steps", 0, "Reverse steps K, respaced (0 = the run's config).")
_SAMPLER = flags.DEFINE_enum("sampler", "", ["", "reverse", "ddim", "one_step"],
                             "Sampler ('' = the run's config).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Users per batch for --input.")
flags.mark_flag_as_required("workdir")
cli.define_distributed_flags()  # One process of several: see README "Several processes".


def main(argv):
  del argv
  cli.setup()
  from diffurec_jax import evaluate
  from diffurec_jax import serve
  from diffurec_jax import sharding

  def run():
    serve.check_arguments(_WORKDIR.value, input_path=_INPUT.value, output=_OUTPUT.value,
                          topk=_TOPK.value, seeds=_SEEDS.value, steps=_STEPS.value,
                          batch_size=_BATCH.value)  # Before loading anything.
    main = sharding.is_main_process()  # Of several processes, process 0 prints and writes.
    note = serve.unfinished_note(_WORKDIR.value)
    if note and main:
      print(note, file=sys.stderr, flush=True)
    overrides = dict(seeds=_SEEDS.value, steps=_STEPS.value, sampler=_SAMPLER.value)
    if not _INPUT.value:
      result, _, loaded = evaluate.evaluate_workdir(_WORKDIR.value, "test", progress=main,
                                                    **overrides)
      result.update(split="test", best_epoch=loaded.epoch,
                    mask_history=bool(loaded.config.train.mask_history),
                    seeds=loaded.config.sample.seeds,
                    steps=loaded.config.sample.steps or loaded.config.model.diffusion_steps)
      if main:
        print(json.dumps(result, sort_keys=True))
      return
    loaded = evaluate.load(_WORKDIR.value, **overrides)
    users, sequences = serve.read_histories(_INPUT.value)
    frame, counts = serve.recommend(loaded, users, sequences, topk=_TOPK.value,
                                    batch_size=_BATCH.value,
                                    exclude_history=_EXCLUDE.value)
    if not main:
      return
    serve.write_recommendations(frame, _OUTPUT.value)
    if counts["unknown_items_skipped"] or counts["users_without_known_items"]:
      print(f"warning: skipped {counts['unknown_items_skipped']} unknown item(s); "
            f"{counts['users_without_known_items']} user(s) had no known item (error rows).",
            file=sys.stderr)
    print(json.dumps({"output": _OUTPUT.value, **counts}))

  cli.run_guarded(run)


if __name__ == "__main__":
  cli.run(main)
