"""Data parallelism without pmap: a 1-D mesh over all devices, batch sharded, state replicated.

Arrays are placed with NamedSharding and `jax.jit` infers the rest. Multi-host runs call
`jax.distributed.initialize()` first (bin/ does it when the usual environment is present);
every process builds the same global batch and contributes the rows of its own devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from diffurec_jax import errors

AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
  """1-D mesh named 'data' over every device (Auto axes, so gathers on sharded batches work)."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(batch_size: int, mesh, name: str = "train.batch_size"):
  devices = mesh.devices.size
  if batch_size % devices:
    raise errors.ConfigError(f"{name}={batch_size} is not divisible by the {devices} devices; "
                     f"set --config.{name} to a multiple of {devices}.")


def replicate(tree, mesh):
  """Places every leaf of `tree` on all devices."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Global host batch -> arrays sharded on their leading axis over the mesh."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  rows = next(iter(batch.values())).shape[0] // jax.process_count()
  begin = jax.process_index() * rows
  return {name: jax.make_array_from_process_local_data(sharding, value[begin:begin + rows])
          for name, value in batch.items()}


def is_main_process() -> bool:
  return jax.process_index() == 0
