"""The official DiffuRec code, imported read-only from a path given on the command line.

No JAX here: bench/upstream_throughput.py imports this module and times torch alone.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np


def upstream_args(config, num_items):
  """The official code's `args` namespace for our config."""
  return types.SimpleNamespace(
      hidden_size=config.model.hidden, dropout=config.model.dropout,
      emb_dropout=config.model.emb_dropout, num_blocks=config.model.num_blocks,
      lambda_uncertainty=config.model.lambda_mean, diffusion_steps=config.model.diffusion_steps,
      noise_schedule=config.model.schedule, schedule_sampler_name="lossaware",
      rescale_timesteps=True, item_num=num_items, max_len=config.data.max_len)


def import_upstream(path: str):
  """The official `diffurec` and `model` modules, imported from `path`."""
  for name in ("diffurec.py", "model.py", "step_sample.py"):
    if not os.path.exists(os.path.join(path, name)):
      sys.exit(f"--upstream {path}: no {name} there; point it at the official code's src/.")
  try:
    import torch  # noqa: F401
  except ImportError:
    sys.exit("torch is not installed: pip install -e '.[parity]' (a CPU wheel is enough).")
  if not hasattr(np, "int"):
    np.int = int  # step_sample.py uses np.int, removed in numpy 1.24.
  sys.path.insert(0, os.path.abspath(path))
  import diffurec as upstream_diffurec
  import model as upstream_model
  return upstream_diffurec, upstream_model
