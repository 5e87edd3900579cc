"""Shared plumbing of the bin/ entrypoints: flags, help, distributed setup, errors for people.

`run(main)` replaces `absl.app.run(main)`: `--help` prints the script's flags, the presets and
every config field with its comment (exit 0); a bad flag, config override or preset is one
`error:` line (exit 2). `run_guarded(function)` turns the project's `errors.UserError`s into
one `error:` line and exit 2, and an interrupt into one line and exit 130; any other
exception is a bug and keeps its traceback. `--verbose` (or DIFFUREC_TRACEBACK=1) shows the
traceback of a user error too. `define_distributed_flags()` gives a script the coordinator
flags, and `setup()` starts jax.distributed from them (or from their JAX_* variables, SLURM).
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
  """Quiet library logging; jax.distributed.initialize() when this is one process of several
  (--coordinator_address / --num_processes / --process_id, their JAX_* variables, or SLURM).
  Inconsistent settings are one `error:` line (exit 2)."""
  from absl import logging
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # Reruns skip recompiling.
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "diffurec_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
  verbosity_given = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
  if not verbosity_given:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO.
  run_guarded(lambda: initialize_distributed(distributed_settings(
      *(_flag_value(name) for name in DISTRIBUTED_FLAGS), os.environ)))


# Several processes (multi-controller JAX) ----------------------------------------------------

DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")
_DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                    "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


class DistributedError(errors.UsageError):
  """Multi-process settings that cannot start a run, in one sentence."""


def define_distributed_flags():
  """--coordinator_address, --num_processes, --process_id (bin/train.py, infer.py,
  experiment.py): this command is one process of a run over several processes or hosts."""
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 (reachable from every process, "
      "the same in all of them) when this is one of several processes; also "
      "JAX_COORDINATOR_ADDRESS.")
  flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run (all hosts "
                       "together); also JAX_NUM_PROCESSES.")
  flags.DEFINE_integer("process_id", None, "This process's number, 0 to num_processes - 1 "
                       "(process 0 writes the workdir); also JAX_PROCESS_ID.")


def _flag_value(name: str):
  return flags.FLAGS[name].value if name in flags.FLAGS else None


def _parse_address(address: str) -> str:
  host, _, port = address.strip().rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"--coordinator_address={address!r} is not host:port; give process "
                           "0's host and a free port, e.g. 10.0.0.1:1234 (127.0.0.1:1234 on "
                           "one machine).")
  return address.strip()


def _parse_count(name: str, value, source: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{source}={value!r} is not an integer; set it to a whole number "
                           f"for --{name}.") from None


def distributed_settings(coordinator_address: str | None, num_processes: int | None,
                         process_id: int | None, environ) -> dict | None:
  """jax.distributed.initialize()'s arguments from the flags, else their JAX_* variables.

  None: a single process. {} under SLURM with nothing set (JAX reads SLURM's variables). An
  address alone lets JAX detect the rest from its cluster environment. Raises
  DistributedError for settings that cannot start (no address, one of the counts missing,
  process_id outside 0 .. num_processes - 1).
  """
  values, sources = {}, {}
  for name, value in zip(DISTRIBUTED_FLAGS, (coordinator_address, num_processes, process_id)):
    variable = _DISTRIBUTED_ENV[name]
    if value is None and environ.get(variable, "").strip():
      value, sources[name] = environ[variable].strip(), variable
    values[name] = value
    sources.setdefault(name, f"--{name}")
  address, count, index = values["coordinator_address"], values["num_processes"], values[
      "process_id"]
  slurm = environ.get("SLURM_NTASKS", "1") != "1"
  if address is None and count is None and index is None:
    return {} if slurm else None
  settings = {}
  if address is not None:
    settings["coordinator_address"] = _parse_address(address)
  elif not slurm:
    raise DistributedError("--num_processes and --process_id need --coordinator_address "
                           "host:port (process 0's host and a free port, the same for every "
                           "process).")
  if count is not None:
    count = settings["num_processes"] = _parse_count("num_processes", count,
                                                     sources["num_processes"])
    if count < 1:
      raise DistributedError(f"{sources['num_processes']}={count}: a run needs at least 1 "
                             "process.")
  if index is not None:
    index = settings["process_id"] = _parse_count("process_id", index, sources["process_id"])
  if (count is None) != (index is None) and not slurm:
    given, missing = (("num_processes", "process_id") if index is None
                      else ("process_id", "num_processes"))
    raise DistributedError(f"--{given} is set but --{missing} is not; give every process "
                           "both (--num_processes N and its own --process_id 0 .. N-1).")
  if count is not None and index is not None and not 0 <= index < count:
    raise DistributedError(f"{sources['process_id']}={index} is outside 0 .. {count - 1} "
                           f"({sources['num_processes']}={count}); number the processes 0 to "
                           f"{count - 1}.")
  return settings


def initialize_distributed(settings: dict | None):
  """jax.distributed.initialize(**settings) (nothing for None): before anything touches a
  device. CPU processes exchange collectives over gloo (jax 0.10's default, set explicitly
  unless JAX_CPU_COLLECTIVES_IMPLEMENTATION chooses another)."""
  import jax
  if settings is None or jax.distributed.is_initialized():
    return
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**settings)
  except (RuntimeError, ValueError) as error:  # Unreachable coordinator, timeout, bad setup.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raise DistributedError(
        f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in settings.items())}) "
        f"failed ({(lines or [type(error).__name__])[0][:200]}); start every process with the "
        "same --coordinator_address and --num_processes, process 0 first reachable at that "
        "address.") from error


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
    if verbose() or "--verbose" in argv or interrupted(error):
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


def caused_by_interrupt(error: BaseException) -> bool:
  """Whether a KeyboardInterrupt is `error` or in its cause/context chain: a Ctrl-C inside a
  C extension's import comes out as the ImportError it caused."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, KeyboardInterrupt):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def interrupted(error: BaseException) -> bool:
  """Whether `error` comes from a Ctrl-C: in its chain, or one was seen since the script began.
  An extension's import may replace the KeyboardInterrupt by an ImportError that does not link
  to it (numpy's 'multiarray failed to import', then jaxlib's own), so the chain is not enough."""
  return _EARLY_SIGINT["seen"] or caused_by_interrupt(error)


def run(main):
  """absl.app.run(main) with `parse_flags`; a Ctrl-C before `run_guarded` is one line too."""
  _install_early_sigint_handler()
  try:
    app.run(main, flags_parser=parse_flags)
  except (Exception, KeyboardInterrupt) as error:  # SystemExit passes through.
    if verbose() or not interrupted(error):
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
  parts += [f"  --{name}: {flags.FLAGS[name].help}" for name in DISTRIBUTED_FLAGS
            if name in flags.FLAGS]
  if "config" in flags.FLAGS:
    parts += ["", "--config takes configs/<dataset>.py[:preset,preset...]: configs/beauty.py, "
                  "configs/toys.py, configs/ml1m.py, configs/custom.py. Presets:"]
    parts += preset_lines()
    parts += ["", "Config fields (override any with --config.<field>=VALUE; defaults of "
                  "diffurec_jax/config.py, before the dataset file and presets):"]
    parts += config_field_lines()
  parts += ["", f"All absl flags: {os.path.basename(program)} --helpfull"]
  return "\n".join(parts)
