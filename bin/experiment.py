"""A grid of variants x seeds, then report.md + report.json + figures/ in one directory.

  python bin/experiment.py --config configs/toys.py --variants diffurec,v1,v2,sasrec \
      --seeds 2 --workdir runs/toys_grid [--config.train.num_epochs=5 ...]

Variants: diffurec, v1, v2, sasrec, and ablations joined with '+' (diffurec+lambda0, v2+nopos;
lambda0, upstream, nopos alone mean diffurec+that; steps1 re-evaluates the diffurec runs with one
reverse step). Each run is an ordinary workdir W/<variant>/seed<k>; rerunning resumes and skips
finished runs. --config.<field> overrides apply to every variant.
"""

from absl import flags
from ml_collections import config_flags

from diffurec_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Dataset config file with optional non-variant presets, e.g. "
    "configs/toys.py or configs/toys.py:smoke.")
_VARIANTS = flags.DEFINE_list("variants", "diffurec,v1,v2,sasrec",
                              "Variants to run, e.g. diffurec,v2,sasrec,lambda0,steps1.")
_BASELINES = flags.DEFINE_list(
    "baselines", [],
    "Variants every other one is paired-t-tested against, e.g. diffurec+lambda0,sasrec "
    "(default: diffurec and sasrec, where in the grid).")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per variant (run k uses config.seed = k).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the grid and its report.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars while training.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()  # One process of several: see README "Several processes".


def main(argv):
  del argv
  cli.setup()
  from diffurec_jax.lab import experiment  # After jax.distributed setup.

  def run():
    config_flag = flags.FLAGS["config"]
    path, presets = experiment.split_config_arg(config_flags.get_config_filename(config_flag))
    default = experiment.load_config_module(path).get_config(presets or None)
    overrides = experiment.extract_overrides(
        _CONFIG.value, default, explicit=config_flags.get_override_values(config_flag))
    experiment.run_experiment(path, presets, overrides, _VARIANTS.value, _SEEDS.value,
                              _WORKDIR.value, progress=_PROGRESS.value,
                              baselines=_BASELINES.value)

  cli.run_guarded(run)


if __name__ == "__main__":
  cli.run(main)
