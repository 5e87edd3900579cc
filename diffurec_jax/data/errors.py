"""The one exception the data pipeline raises for bad input.

Bad input (a missing file, misnamed columns, unparsable timestamps, a dataset that
filtering emptied) is caught at the boundary and reported as a `DataError` whose
message is one sentence for a person: what was wrong, where, and what to do.
Internal invariants use assertions instead.
"""

from diffurec_jax import errors


class DataError(errors.UserError):
  """Bad input data or data configuration; the message says what to do."""
