"""MovieLens-1M, all 1,000,209 ratings (DiffuRec's version): `--config configs/ml1m.py[:presets]`.

No item filter by default (6,040 users / 3,706 items); `--config.data.item_core=5` gives
the SASRec/BERT4Rec version (3,416 items / 999,611 interactions).
"""

from diffurec_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "ml-1m"
  config.data.item_core = 0
  config = config_lib.apply_presets(config, arg)
  presets = set((arg or "").split(","))
  if not presets & {"smoke", "upstream"}:  # Those fix their own max_len.
    config.data.max_len = 200  # ML-1M histories are long (median 96).
  return config
