"""The hash-based dropout mask: rate, scaling, independence, determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffurec_jax.models import attention


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_fraction_and_scaling(rate):
  x = jnp.ones((256, 50, 128))
  y = np.asarray(attention.dropout(x, rate, jax.random.key(0)))
  kept = y != 0
  # 1.6M Bernoulli draws: the standard error of the kept fraction is < 4e-4.
  assert abs(kept.mean() - (1 - rate)) < 2e-3
  np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)


def test_masks_differ_between_keys_and_repeat_for_one_key():
  x = jnp.ones((64, 128))
  a = attention.dropout(x, 0.5, jax.random.key(1))
  b = attention.dropout(x, 0.5, jax.random.key(2))
  chex.assert_trees_all_equal(a, attention.dropout(x, 0.5, jax.random.key(1)))
  # Independent masks agree on about half the elements.
  assert 0.45 < float(jnp.mean((a != 0) == (b != 0))) < 0.55


def test_neighbouring_elements_are_uncorrelated():
  bits = np.asarray(attention.hash_uniform_bits(jax.random.key(3), (1 << 20,)), np.float64)
  u = bits / 2**32
  assert abs(u.mean() - 0.5) < 2e-3
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5e-3
  assert abs(np.corrcoef(u[:-128], u[128:])[0, 1]) < 5e-3


def test_identity_in_evaluation_and_at_rate_zero():
  x = jnp.arange(6.0).reshape(2, 3)
  chex.assert_trees_all_equal(attention.dropout(x, 0.3, None), x)
  chex.assert_trees_all_equal(attention.dropout(x, 0.0, jax.random.key(0)), x)
