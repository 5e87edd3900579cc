"""The errors a person can fix, printed by the bin/ scripts as one `error:` line (exit 2).

Each layer raises its own subclass of `UserError` where it detects bad input (DataError in
data/, ConfigError in config_check, WorkdirError and CheckpointError in training/,
InputError in serve, LedgerError in lab/ledger). `cli.run_guarded` prints exactly these; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from a person; the message is one sentence that says what to do."""


class UsageError(UserError, ValueError):
  """A bad argument of an entry point (a flag value, an empty list, an unknown name)."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (config_check.validate lists every one)."""
