"""Shared tiny shapes and a hand-made history batch for the model and sampler tests."""

import jax.numpy as jnp

NUM_ITEMS = 20
HIDDEN = 16
MAX_LEN = 8

# Left-padded, the most recent item last; at most 4 items per row, so the last 4 columns hold
# every item and HISTORY[:, 4:] is the same histories with 4 fewer padding columns.
HISTORY = jnp.array([
    [0, 0, 0, 0, 0, 3, 7, 5],
    [0, 0, 0, 0, 1, 2, 3, 4],
    [0, 0, 0, 0, 0, 0, 9, 11],
    [0, 0, 0, 0, 6, 6, 12, 19],
], jnp.int32)
