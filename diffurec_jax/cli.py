"""Shared plumbing of the bin/ entrypoints: flags, help, distributed setup, errors for people.

`run(main)` replaces `absl.app.run(main)`: `--help` prints the script's flags, the presets and
every config field with its comment (exit 0); a bad flag, config override or preset is one
`error:` line (exit 2). `run_guarded(function)` turns the project's `errors.UserError`s into
one `error:` line and exit 2, and an interrupt into one line and exit 130; any other
exception is a bug and keeps its traceback. `--verbose` (or DIFFUREC_TRACEBACK=1) shows the
traceback of a user error too.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from absl import app
from absl import flags

from diffurec_jax import errors

_HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "-help")

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the traceback of an error (also DIFFUREC_TRACEBACK=1).")


def verbose() -> bool:
  if os.environ.get("DIFFUREC_TRACEBACK", "") not in ("", "0"):
    return True
  try:
    return bool(flags.FLAGS["verbose"].present and _VERBOSE.value)
  except flags.Error:  # Flags not parsed (yet): a flag error is being reported.
    return "--verbose" in sys.argv


def setup():
  """Quiet library logging; jax.distributed.initialize() in a multi-host environment."""
  from absl import logging
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # Reruns skip recompiling.
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "diffurec_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
  verbosity_given = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
  if not verbosity_given:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO.
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def run_guarded(function):
  """Runs `function`; user errors become `error: ...` (exit 2), interrupts exit 130."""
  from diffurec_jax.training import interrupt
  try:
    if _EARLY_SIGINT["seen"]:  # A Ctrl-C during the imports that a GC callback swallowed.
      raise KeyboardInterrupt
    result = function()
    if _EARLY_SIGINT["seen"]:
      raise KeyboardInterrupt
    return result
  except interrupt.Interrupted as error:
    if verbose():
      raise
    print(str(error), file=sys.stderr, flush=True)
    sys.exit(interrupt.EXIT_STATUS)
  except KeyboardInterrupt:
    if verbose():
      raise
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(interrupt.EXIT_STATUS)
  except errors.UserError as error:
    if verbose():
      raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


# Flags and help ------------------------------------------------------------------------------


# Names people type for a field that has another name here (train.lr -> train.learning_rate).
_SYNONYMS = {"lr": "learning_rate", "epochs": "num_epochs", "bs": "batch_size",
             "batch": "batch_size", "wd": "weight_decay", "layers": "num_blocks",
             "blocks": "num_blocks", "heads": "num_heads", "maxlen": "max_len",
             "seq_len": "max_len", "hidden_size": "hidden", "dim": "hidden",
             "timesteps": "diffusion_steps", "T": "diffusion_steps"}


def suggest_field(field: str) -> str | None:
  """The config field a mistyped `field` ('train.lr') most likely means, or None."""
  from diffurec_jax import config as config_lib
  names = [name for name, _, _ in config_lib.FIELDS]
  section, _, name = field.rpartition(".")
  if name in _SYNONYMS:
    matches = [n for n in names if n.rpartition(".")[2] == _SYNONYMS[name]]
    same_section = [n for n in matches if n.rpartition(".")[0] == section]
    return (same_section or matches or [None])[0]
  return (difflib.get_close_matches(field, names, n=1, cutoff=0.6) or [None])[0]


def _unknown_field(line: str, argv) -> str | None:
  """'no such config field ...; did you mean ...' for a bare KeyError naming an override."""
  match = re.fullmatch(r"'(\w+)'", line)
  if not match:
    return None
  for arg in argv or ():
    field = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and field.rpartition(".")[2] == match.group(1):
      suggestion = suggest_field(field)
      return f"no such config field {field!r}" + (
          f"; did you mean {suggestion!r}?" if suggestion else "")
  return None


def _one_line(error: Exception, argv=()) -> str:
  """The human part of a flag-parsing error, on one line."""
  while isinstance(error, (KeyError, AttributeError)) and error.args and isinstance(
      error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:
    lines = lines[-1:]  # The config file's own error, not the stack.
  line = re.sub(r"^[\w.]+(Error|Exception): ", "", " ".join(lines))
  if "Did you mean" in line:
    line = "no such config field " + line.replace(" Did you mean", "; did you mean")
  return _unknown_field(line, argv) or line


def parse_flags(argv):
  """absl flag parsing; --help exits 0 with the full help, a bad flag or config exits 2."""
  if any(arg in _HELP_ARGS for arg in argv[1:]):
    print(help_text(argv[0]))
    sys.exit(0)
  try:
    args = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      _ = flags.FLAGS.config.data  # A config file that failed to load raises only when read.
      from diffurec_jax import config_check
      config_check.validate(flags.FLAGS.config)  # Values, before anything is read or built.
    return args
  except (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError) as error:
    if verbose() or "--verbose" in argv:
      raise
    if isinstance(error, errors.UserError):
      print(f"error: {error}", file=sys.stderr)
    else:
      print(f"error: bad flag or config ({_one_line(error, argv)}); see --help.", file=sys.stderr)
    sys.exit(2)


_EARLY_SIGINT = {"seen": False}


def _install_early_sigint_handler():
  """Before a script imports the heavy libraries: Ctrl-C raises KeyboardInterrupt and is
  remembered, so one that lands in a garbage-collector callback (where Python swallows
  exceptions and prints 'Exception ignored') still stops the script (run_guarded checks)."""
  import signal
  import threading
  if threading.current_thread() is not threading.main_thread():
    return

  def handle(number, frame):
    del number, frame
    _EARLY_SIGINT["seen"] = True
    raise KeyboardInterrupt

  signal.signal(signal.SIGINT, handle)
  previous = sys.unraisablehook

  def quiet(unraisable):
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
      previous(unraisable)

  sys.unraisablehook = quiet


def run(main):
  """absl.app.run(main) with `parse_flags`; a Ctrl-C before `run_guarded` is one line too."""
  _install_early_sigint_handler()
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    if verbose():
      raise
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)  # 128 + SIGINT, as interrupt.EXIT_STATUS.


def _first_line(text: str | None) -> str:
  return (text or "").strip().splitlines()[0].rstrip(".") if (text or "").strip() else ""


def preset_lines() -> list[str]:
  from diffurec_jax import config as config_lib
  lines = []
  for name, function in config_lib.PRESETS.items():
    note = _first_line(function.__doc__)
    lines.append(f"  {name:12s} {note}")
  return lines


def config_field_lines() -> list[str]:
  """`  train.batch_size = 1024  # Global batch (divided over devices).` for every field."""
  from diffurec_jax import config as config_lib
  return [f"  {field} = {default!r}" + (f"  # {text}" if text else "")
          for field, default, text in config_lib.FIELDS]


def help_text(program: str) -> str:
  main = sys.modules.get("__main__")
  parts = [(main.__doc__ or "").strip(), "", "flags:",
           flags.FLAGS.main_module_help().split("\n", 1)[-1] if flags.FLAGS.main_module_help()
           else "  (none)",
           "  --[no]verbose: " + flags.FLAGS["verbose"].help]
  if "config" in flags.FLAGS:
    parts += ["", "--config takes configs/<dataset>.py[:preset,preset...]: configs/beauty.py, "
                  "configs/toys.py, configs/ml1m.py, configs/custom.py. Presets:"]
    parts += preset_lines()
    parts += ["", "Config fields (override any with --config.<field>=VALUE; defaults of "
                  "diffurec_jax/config.py, before the dataset file and presets):"]
    parts += config_field_lines()
  parts += ["", f"All absl flags: {os.path.basename(program)} --helpfull"]
  return "\n".join(parts)
