"""Train, select on validation, test once: `python bin/train.py --config configs/toys.py --workdir runs/toys`.

Rerunning the same command resumes from the latest checkpoint; a finished run says so (and is
left untouched). When training ends, process 0 draws W/figures/learning_curve.png (when
matplotlib is installed).

On several processes or hosts, run the same command in each with --coordinator_address
HOST:PORT --num_processes N --process_id K (K = 0 .. N-1; process 0 writes the workdir).
"""

import os

from absl import flags
from ml_collections import config_flags

from diffurec_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toys.py:v2.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory that owns the run.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()  # One process of several: see README "Several processes".


def main(argv):
  del argv
  cli.setup()
  from diffurec_jax import sharding
  from diffurec_jax.lab import learning_curve
  from diffurec_jax.training import loop as train  # After jax.distributed setup.

  def run():
    # A run finished before this command is never written to (it may be read-only).
    finished = os.path.exists(os.path.join(_WORKDIR.value, "results.json"))
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if sharding.is_main_process() and not finished:
      learning_curve.write_quietly(_WORKDIR.value)

  cli.run_guarded(run)


if __name__ == "__main__":
  cli.run(main)
