"""The data pipeline: raw interaction files -> a prepared, cached `Dataset`.

  from diffurec_jax import data
  ds = data.prepare(config.data)                 # Dataset (cached on disk)
  train = data.splits.training_examples(ds)      # every training prefix
  test = data.splits.eval_examples(ds, "test")   # one per user
  history = data.splits.gather_histories(ds.items, test.starts, test.ends, 50)

Modules: readers (file formats), columns (ids, times and ratings cleaned), transforms
(filtering, ordering, remapping), registry (registered datasets, data roots, downloads),
pipeline (Dataset, prepare, cache), splits (leave-one-out examples and padded histories).
"""

from diffurec_jax.data import columns, readers, registry, splits, transforms
from diffurec_jax.data.errors import DataError
from diffurec_jax.data.pipeline import Dataset, prepare, prepare_and_report, prepare_with_info

__all__ = ["DataError", "Dataset", "columns", "prepare", "prepare_and_report",
           "prepare_with_info", "readers", "registry", "splits", "transforms"]
