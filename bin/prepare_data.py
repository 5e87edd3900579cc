"""Prepares a dataset and prints its statistics (last line: the same as JSON).

  python bin/prepare_data.py --config configs/beauty.py
  python bin/prepare_data.py --config configs/custom.py --config.data.path=my_log.csv

Bad input prints `error: <message>` to stderr and exits with status 2.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from diffurec_jax import cli
from diffurec_jax import data

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/beauty.py.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")

  def run():
    report = data.prepare_and_report(FLAGS.config.data)
    print(data.pipeline.format_table(report))
    print(json.dumps(report))

  cli.run_guarded(run)


if __name__ == "__main__":
  cli.run(main)
