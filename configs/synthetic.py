"""A generated catalog with a planted signal: `--config configs/synthetic.py[:presets]`.

Size presets pick the number of items: `items_1e4` (the default), `items_1e5`, `items_1e6`;
they combine with the other presets, e.g. `configs/synthetic.py:items_1e5,sasrec`. The log is
generated on first use into the user cache dir (diffurec_jax/data/synthetic.py); change it with
`--config.data.synthetic_users/_signal/_zipf/_seed`. The oracle that knows each item's successor
reaches HR@1 ~ data.synthetic_signal (default 0.5) on the test items.
"""

from diffurec_jax import config as config_lib
from diffurec_jax import errors

SIZES = {"items_1e4": 10_000, "items_1e5": 100_000, "items_1e6": 1_000_000}


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "synthetic"
  names = [name.strip() for name in (arg or "").split(",") if name.strip()]
  sizes = [name for name in names if name in SIZES]
  if len(sizes) > 1:
    raise errors.ConfigError(f"Choose one size preset, got {sizes}.")
  unknown = [name for name in names if name not in SIZES and name not in config_lib.PRESETS]
  if unknown:
    raise errors.ConfigError(
        f"Unknown preset(s) {unknown} in ':{arg}'; known presets: "
        f"{sorted(config_lib.PRESETS) + sorted(SIZES)}.")
  config.data.synthetic_items = SIZES[sizes[0]] if sizes else SIZES["items_1e4"]
  return config_lib.apply_presets(config, ",".join(name for name in names if name not in SIZES))
