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
ITEM_AXIS = "items"  # catalog.AXIS: the rows of the item table (catalog.shards > 1).
_ITEM_TABLE = "item_embedding"


def make_mesh(item_shards: int = 1) -> jax.sharding.Mesh:
  """1-D mesh named 'data' over every device (Auto axes, so gathers on sharded batches work);
  with item_shards > 1, a 2-D mesh ('data', 'items') of (devices / item_shards, item_shards)."""
  devices = jax.device_count()
  if item_shards <= 1:
    return jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  if devices % item_shards:
    raise errors.ConfigError(f"catalog.shards={item_shards} does not divide the {devices} "
                             "devices; set --config.catalog.shards to a divisor of "
                             f"{devices}.")
  return jax.make_mesh((devices // item_shards, item_shards), (AXIS, ITEM_AXIS),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def item_shards(mesh) -> int:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(ITEM_AXIS, 1)


def check_batch_size(batch_size: int, mesh, name: str = "train.batch_size"):
  devices = dict(zip(mesh.axis_names, mesh.axis_sizes))[AXIS]
  if batch_size % devices:
    raise errors.ConfigError(f"{name}={batch_size} is not divisible by the {devices} devices; "
                     f"set --config.{name} to a multiple of {devices}.")


def replicate(tree, mesh):
  """Places every leaf of `tree` on all devices; on a mesh with an 'items' axis the item
  table and its optimizer moments (leaves under 'item_embedding') have their rows sharded."""
  replicated = NamedSharding(mesh, PartitionSpec())
  if item_shards(mesh) <= 1:
    return jax.device_put(tree, replicated)
  rows = NamedSharding(mesh, PartitionSpec(ITEM_AXIS))

  def place(path, leaf):
    on_table = any(getattr(key, "key", getattr(key, "name", None)) == _ITEM_TABLE
                   for key in path)
    return jax.device_put(leaf, rows if on_table and np.ndim(leaf) == 2 else replicated)

  return jax.tree_util.tree_map_with_path(place, tree)


def under_mesh(function, mesh):
  """`function` traced and run with `mesh` as the current mesh (jax.set_mesh) when the mesh
  shards the item table, which catalog.py reads; unchanged otherwise."""
  if item_shards(mesh) <= 1:
    return function

  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return function(*args, **kwargs)

  def lower(*args, **kwargs):  # As jitted.lower (benchmarks read costs and memory from it).
    with jax.set_mesh(mesh):
      return function.lower(*args, **kwargs)

  call.lower = lower
  return call


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Global host batch -> arrays sharded on their leading axis over the mesh's 'data' axis.

  Every process builds the same global batch; in a multi-process run each one transfers only
  the rows its own devices hold (whatever their place in the mesh), so every process's
  devices see exactly the rows they would see in one process.
  """
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {name: jax.make_array_from_callback(value.shape, sharding,
                                             lambda index, value=value: value[index])
          for name, value in batch.items()}


def is_main_process() -> bool:
  """Process 0 of a multi-process run (the only one that writes the workdir); True alone."""
  return jax.process_index() == 0
