"""MovieLens-1M, all 1,000,209 ratings (DiffuRec's version): `--config configs/ml1m.py[:presets]`.

No item filter by default (6,040 users / 3,706 items); `--config.data.item_core=5` gives
the SASRec/BERT4Rec version (3,416 items / 999,611 interactions). Histories are long (median
96): the papers' variants keep the last 200 items; the released DiffuRecSys code's presets
keep their own 100, and `smoke` / `upstream` set their own lengths after this.
"""

from diffurec_jax import config as config_lib


def _long_histories(config, variant: str):
  if variant not in config_lib.RELEASED_VARIANTS:
    config.data.max_len = 200


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "ml-1m"
  config.data.item_core = 0
  return config_lib.apply_presets(config, arg, dataset_defaults=_long_histories)
