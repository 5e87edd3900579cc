"""Your own interaction log: `--config configs/custom.py[:presets] --config.data.path=FILE`.

The format is detected from the extension and header, or set with
`--config.data.format=long|inter|movielens|amazon|sequences`; long-format column
names with `--config.data.user_col=... --config.data.item_col=... --config.data.time_col=...`.
"""

from diffurec_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "custom"
  return config_lib.apply_presets(config, arg)
