"""Accuracy vs reverse steps K of a trained workdir: table, JSON and plot.

  python bench/steps.py --workdir W [--ks 1,2,4,8,16,32] [--samplers reverse,ddim] [--seeds 3]
                        [--max_users 0] [--eta 0] [--out DIR]

Writes DIR (default W/steps)/steps.json, steps.md (the command, machine, users and the table)
and steps.png (ndcg@10 and users/s vs K); prints the table and, as its last line, JSON of the
rows (their summaries; the per-seed metrics are in steps.json). Bad input (no checkpoint,
K < 1, ...) is one `error: ...` line and exit status 2.
"""

import json
import os
import shlex
import sys

from absl import app, flags

from diffurec_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir trained by bin/train.py.")
_KS = flags.DEFINE_string("ks", "1,2,4,8,16,32", "Comma-separated reverse step counts K.")
_SAMPLERS = flags.DEFINE_string("samplers", "reverse,ddim",
                                "Comma-separated samplers (reverse, ddim); one_step is always "
                                "added as a reference row.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Chain seeds per (sampler, K): mean and std over them.")
_MAX_USERS = flags.DEFINE_integer("max_users", 0,
                                  "Evaluate a fixed random subset of this many users (0 = all).")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).")
_SPLIT = flags.DEFINE_enum("split", "test", ["valid", "test"], "Split to evaluate.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/steps).")
flags.mark_flag_as_required("workdir")


def _integers(text: str, name: str) -> list[int]:
  try:
    return [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"--{name}={text!r} is not a comma-separated list of integers.") from None


def main(argv):
  del argv
  cli.setup()
  from diffurec_jax.lab import steps_curve

  def run():
    if not os.path.isdir(_WORKDIR.value):
      raise ValueError(f"--workdir {_WORKDIR.value} does not exist; train one with "
                       "bin/train.py first.")
    ks = _integers(_KS.value, "ks")
    samplers = [s.strip() for s in _SAMPLERS.value.split(",") if s.strip()]
    result = steps_curve.steps_curve(_WORKDIR.value, ks=ks, samplers=samplers,
                                     seeds=_SEEDS.value, split=_SPLIT.value,
                                     max_users=_MAX_USERS.value, eta=_ETA.value)
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    paths = steps_curve.write_report(result, _OUT.value or os.path.join(_WORKDIR.value, "steps"),
                                     command)
    print(steps_curve.markdown(result, command))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    # Per-seed metrics and every mean are in steps.json; the line keeps each row's summary.
    rows = [{k: v for k, v in row.items() if k not in ("per_seed", "mean")}
            for row in result["rows"]]
    print(json.dumps(rows), flush=True)

  cli.run_guarded(run)


if __name__ == "__main__":
  app.run(main)
