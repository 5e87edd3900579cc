"""Prepares a dataset and prints its statistics (last line: the same as JSON).

  python bin/prepare_data.py --config configs/beauty.py
  python bin/prepare_data.py --config configs/custom.py --config.data.path=my_log.csv

Bad input prints `error: <message>` to stderr and exits with status 2.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from diffurec_jax import data

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/beauty.py.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def _one_line(error: Exception) -> str:
  """The human part of a flag-parsing error, on one line."""
  while isinstance(error, (KeyError, AttributeError)) and error.args and isinstance(
      error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:
    lines = lines[-1:]  # The config file's own error, not the stack.
  return " ".join(lines)


def parse_flags(argv):
  """absl flag parsing, but a bad flag or config override exits 2 with one line."""
  try:
    args = FLAGS(argv)
    _ = FLAGS.config.data  # A config file that failed to load raises only when read.
    return args
  except (flags.Error, KeyError, AttributeError, OSError, ValueError) as e:
    print(f"error: bad flag or config ({_one_line(e)}); see --helpfull and the config file.",
          file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  try:
    report = data.prepare_and_report(FLAGS.config.data)
  except data.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(data.pipeline.format_table(report))
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
