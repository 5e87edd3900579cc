"""The functional boundary around an NNX module: `Bundle(graphdef, params)`, a pytree.

The graphdef is static, so functions of a bundle (`denoise`, the losses, the samplers) are
pure: they `merge` inside `jax.jit`, `vmap` and `lax.scan` without retracing, and the
parameters travel as ordinary arrays (sharded, donated, checkpointed).
"""

from __future__ import annotations

import flax
from flax import nnx


@flax.struct.dataclass
class Bundle:
  """A model as a pytree: static graph definition + parameter state."""
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  params: nnx.State


def split(module: nnx.Module) -> Bundle:
  graphdef, params = nnx.split(module)
  return Bundle(graphdef, params)


def merge(bundle: Bundle) -> nnx.Module:
  return nnx.merge(bundle.graphdef, bundle.params)
