"""Shared plumbing of the bin/ entrypoints: distributed setup and errors for people."""

from __future__ import annotations

import os
import sys

# The exceptions that mean "bad input": one sentence on stderr, exit status 2.
_USER_ERRORS = ("DataError", "WorkdirError", "CheckpointError", "InputError",
                "FloatingPointError", "ValueError")


def setup():
  """Quiet library logging; jax.distributed.initialize() in a multi-host environment."""
  from absl import logging
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # Reruns skip recompiling.
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "diffurec_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
  from absl import flags
  verbosity_given = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
  if not verbosity_given:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO.
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def run_guarded(function):
  """Runs `function`; known user errors become `error: ...` and exit status 2."""
  try:
    return function()
  except Exception as error:  # Re-raised unless it is one of the user-facing kinds.
    if type(error).__name__ not in _USER_ERRORS:
      raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
