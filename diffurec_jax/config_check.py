"""Checks a config's values before any data is read or any step compiled.

`validate(config)` raises `errors.ConfigError` naming every bad field, its value, what is allowed
and the flag that fixes it, so a typo costs a second instead of an epoch.
"""

from __future__ import annotations

from diffurec_jax import sampled_softmax
from diffurec_jax import config as config_lib
from diffurec_jax import diffusion
from diffurec_jax import errors
from diffurec_jax import metrics
from diffurec_jax import samplers
from diffurec_jax.data import columns
from diffurec_jax.data import readers
from diffurec_jax.data import transforms
from diffurec_jax.models import attention
from diffurec_jax.models import layers
from diffurec_jax.models import mixing
from diffurec_jax.training import optimizer
from diffurec_jax.training import selection


def _problems(config) -> list[str]:
  problems = []

  def need(ok: bool, field: str, allowed: str):
    if not ok:
      section, _, name = field.rpartition(".")
      value = (config[section] if section else config)[name]
      problems.append(f"{field}={value!r} must be {allowed} (--config.{field}=...)")

  def one_of(field: str, choices):
    section, _, name = field.rpartition(".")
    need((config[section] if section else config)[name] in choices, field,
         "one of " + ", ".join(map(str, choices)))

  def integer(value):
    return isinstance(value, int) and not isinstance(value, bool)

  data, model, train, samp = config.data, config.model, config.train, config.sample
  one_of("variant", config_lib.VARIANTS)
  need(integer(data.max_len) and data.max_len >= 1, "data.max_len", "an integer >= 1")
  need(integer(data.max_users) and data.max_users >= 0, "data.max_users", "an integer >= 0")
  need(integer(data.user_core) and data.user_core >= 0, "data.user_core", "an integer >= 0")
  need(integer(data.item_core) and data.item_core >= 0, "data.item_core", "an integer >= 0")
  one_of("data.format", ("auto",) + readers.FORMATS)
  one_of("data.dedup", transforms.DEDUP_MODES)
  one_of("data.missing_ids", columns.MISSING_ID_MODES)
  one_of("data.short_users", transforms.SHORT_USER_MODES)

  need(integer(model.hidden) and model.hidden >= 1, "model.hidden", "an integer >= 1")
  need(integer(model.num_blocks) and model.num_blocks >= 1, "model.num_blocks",
       "an integer >= 1")
  need(integer(model.num_heads) and model.num_heads >= 1
       and integer(model.hidden) and model.hidden % max(model.num_heads, 1) == 0,
       "model.num_heads", f"an integer >= 1 that divides model.hidden={model.hidden}")
  for field in ("dropout", "emb_dropout"):
    need(0.0 <= model[field] < 1.0, f"model.{field}", "in [0, 1)")
  need(model.lambda_std >= 0, "model.lambda_std", ">= 0")
  need(integer(config.catalog.block) and config.catalog.block >= 0, "catalog.block",
       "an integer >= 0 (0 = score all items at once)")
  need(integer(config.catalog.shards) and config.catalog.shards >= 1, "catalog.shards",
       "an integer >= 1")
  one_of("catalog.loss", sampled_softmax.LOSSES)
  one_of("catalog.negative_sampler", sampled_softmax.NEGATIVE_SAMPLERS)
  need(integer(config.catalog.negatives) and config.catalog.negatives >= 1,
       "catalog.negatives", "an integer >= 1")
  need(model.item_init_std > 0, "model.item_init_std", "> 0")
  one_of("model.mixing", mixing.MIXINGS)
  one_of("model.schedule", diffusion.SCHEDULES)
  one_of("model.reverse_variance", diffusion.VARIANCES)
  one_of("model.init", layers.INITS)
  one_of("model.cross_attention_form", attention.CROSS_FORMS)
  steps_ok = integer(model.diffusion_steps) and model.diffusion_steps >= 1
  if steps_ok and model.schedule in diffusion.SCHEDULES:
    try:
      diffusion.beta_schedule(model.schedule, model.diffusion_steps)
    except ValueError as error:
      steps_ok = False
      need(False, "model.diffusion_steps", f"valid for the {model.schedule} schedule ({error})")
  else:
    need(steps_ok, "model.diffusion_steps", "an integer >= 1")
  one_of("offset_noise.mode", diffusion.NOISE_MODES)

  for field in ("batch_size", "eval_batch_size"):
    need(integer(train[field]) and train[field] >= 1, f"train.{field}", "an integer >= 1")
  need(train.learning_rate >= 0, "train.learning_rate", ">= 0")
  need(train.weight_decay >= 0, "train.weight_decay", ">= 0")
  need(train.grad_clip >= 0, "train.grad_clip", ">= 0 (0 = off)")
  need(train.microbatch_tokens >= 0, "train.microbatch_tokens", ">= 0 (0 = whole batches)")
  need(train.warmup_epochs >= 0, "train.warmup_epochs", ">= 0")
  need(integer(train.lr_decay_epochs) and train.lr_decay_epochs >= 0, "train.lr_decay_epochs",
       "an integer >= 0 (0 = off)")
  need(integer(train.num_epochs) and train.num_epochs >= 1, "train.num_epochs",
       "an integer >= 1")
  need(integer(train.eval_every) and train.eval_every >= 1, "train.eval_every",
       "an integer >= 1")
  need(integer(train.patience) and train.patience >= 0, "train.patience",
       "an integer >= 0 (0 = off)")
  need(integer(train.keep_checkpoints) and train.keep_checkpoints >= 1,
       "train.keep_checkpoints", "an integer >= 1")
  need(integer(train.max_steps_per_epoch) and train.max_steps_per_epoch >= 0,
       "train.max_steps_per_epoch", "an integer >= 0 (0 = full epochs)")
  need(integer(train.valid_users) and train.valid_users >= 0, "train.valid_users",
       "an integer >= 0 (0 = all users)")
  need(all(integer(b) and b >= 1 for b in train.length_buckets), "train.length_buckets",
       "a tuple of integers >= 1")
  one_of("train.valid_metric", metrics.VALID_METRICS)
  one_of("train.selection", selection.SELECTIONS)
  one_of("train.lr_schedule", optimizer.LR_SCHEDULES)

  one_of("sample.sampler", samplers.SAMPLERS)
  limit = model.diffusion_steps if steps_ok else None
  for field in ("train.valid_steps", "sample.steps"):
    section, name = field.split(".")
    value = config[section][name]
    need(integer(value) and value >= 0 and (limit is None or value <= limit), field,
         f"an integer in [0, model.diffusion_steps={model.diffusion_steps}] (0 = all steps)")
  need(integer(samp.seeds) and samp.seeds >= 1, "sample.seeds", "an integer >= 1")
  need(samp.eta >= 0, "sample.eta", ">= 0")
  return problems


def validate(config):
  """Raises errors.ConfigError listing every field whose value cannot work."""
  try:
    problems = _problems(config)
  except (TypeError, KeyError, AttributeError) as error:  # A field of the wrong kind.
    raise errors.ConfigError(f"The config cannot be checked ({type(error).__name__}: {error}); "
                      "compare it with diffurec_jax/config.py.") from error
  if problems:
    raise errors.ConfigError("Bad config value" + ("s" if len(problems) > 1 else "") + ": "
                      + "; ".join(problems) + ".")
