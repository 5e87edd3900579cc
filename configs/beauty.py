"""Amazon Beauty (2014 5-core, S3-Rec files): `--config configs/beauty.py[:presets]`."""

from diffurec_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "beauty"
  return config_lib.apply_presets(config, arg)
