"""Train, select on validation, test once: `python bin/train.py --config configs/toys.py --workdir runs/toys`.

Rerunning the same command resumes from the latest checkpoint; a finished run says so.
"""

from absl import flags
from ml_collections import config_flags

from diffurec_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toys.py:v2.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory that owns the run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.setup()
  from diffurec_jax.training import loop as train  # After jax.distributed setup.
  cli.run_guarded(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  cli.run(main)
