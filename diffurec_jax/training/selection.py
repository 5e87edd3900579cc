"""Checkpoint selection on validation: does this validation make a new best checkpoint?"""

from __future__ import annotations

import math

from diffurec_jax import metrics

# metric: the configured validation metric beats its best so far. any: some HR/NDCG/MRR@K
# beats its own best so far (the DiffuRec code's rule: it also resets the patience count).
SELECTIONS = ("metric", "any")


def improved(valid: dict, best_metric: float, best_valid: dict, metric: str,
             selection: str) -> bool:
  """Whether `valid` (a validation's metrics) is a new best under `selection`."""
  if selection == "metric":
    return valid[metric] > best_metric
  if selection == "any":
    return any(v > best_valid.get(k, -math.inf) for k, v in valid.items()
               if k in metrics.RESULT_KEYS)
  raise ValueError(f"train.selection={selection!r}; use one of {SELECTIONS}.")


def best_so_far(valid: dict, best_valid: dict) -> dict:
  """Each metric's best value over the validations so far, this one included."""
  return {k: max(v, best_valid.get(k, -math.inf)) for k, v in valid.items()
          if k in metrics.RESULT_KEYS}
