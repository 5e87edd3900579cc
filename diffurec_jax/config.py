"""Default configuration and presets, defined once for every dataset config.

`configs/<dataset>.py` calls `base_config()`, overrides what differs for its data,
then `apply_presets(config, arg)` applies the comma-separated `:arg` suffix of
`--config configs/toys.py:v2,smoke`. Presets are applied left to right.
"""

from __future__ import annotations

import ml_collections

from diffurec_jax import errors

# Variant presets pick the system; they are mutually exclusive.
VARIANTS = ("diffurec", "v1", "v2", "sasrec")
# DiffuRecSys's released code (github.com/shararezr/DiffuRecSys): variant presets too, which
# set config.variant to v1 / v2 and the switches that reproduce that code.
RELEASED_VARIANTS = ("v1_released", "v2_released")


# (field, default, help) of every config field: the defaults shared by every dataset (the
# papers' model, trained with the fast recipe) and the field list of `--help`.
FIELDS = (
    ("seed", 0, "Seeds parameters, data order, diffusion noise and dropout."),
    ("variant", "diffurec", "One of VARIANTS; set through presets."),
    ("data.name", "custom", "'beauty', 'toys', 'ml-1m' (registered), 'synthetic' or 'custom'."),
    ("data.root", "", "Raw-data root; '' = $DIFFUREC_DATA, else the user cache dir."),
    ("data.path", "", "Custom data: the interaction file to read."),
    ("data.format", "auto", "auto|long|inter|movielens|amazon|sequences."),
    ("data.user_col", "user", "Long format: user column name."),
    ("data.item_col", "item", "Long format: item column name."),
    ("data.time_col", "timestamp", "Long format: time column ('' = file order)."),
    ("data.rating_col", "", "Long format: rating column ('' = none)."),
    ("data.separator", "", "Long format: field separator ('' = from the extension)."),
    ("data.dedup", "none", "none|first|last: repeated (user, item) pairs."),
    ("data.missing_ids", "error", "error|drop: rows with an empty/NaN/null user or item id."),
    ("data.min_rating", -1.0, "Keep ratings >= this; negative = keep all."),
    ("data.user_core", 5, "Iterative k-core: min interactions per user (0 = off)."),
    ("data.item_core", 5, "Iterative k-core: min interactions per item (0 = off)."),
    ("data.short_users", "drop", "drop|error: users with < 3 interactions after filtering."),
    ("data.max_users", 0, "Keep only the first N users (0 = all); for smoke runs."),
    ("data.max_len", 100, "History length: the most recent max_len items."),
    ("data.cache_dir", "", "Prepared-split cache; '' = $DIFFUREC_CACHE or user cache dir."),
    ("data.download", True, "Download missing registered files when a network exists."),
    ("data.synthetic_items", 10_000, "Synthetic data: number of items N (ids 1..N)."),
    ("data.synthetic_users", 0, "Synthetic: users (0 = 2x those needed for 5 of every item)."),
    ("data.synthetic_signal", 0.5,
     "Synthetic: P(next item = previous item's fixed successor); oracle HR@1 ~ this."),
    ("data.synthetic_zipf", 1.0, "Synthetic: Zipf exponent of item popularity (0 = uniform)."),
    ("data.synthetic_seed", 0, "Synthetic: seed of the generated log (independent of `seed`)."),
    ("model.hidden", 128, "Embedding and Transformer width."),
    ("model.num_blocks", 4, "Transformer blocks in the approximator."),
    ("model.num_heads", 4, "Attention heads."),
    ("model.dropout", 0.1, "Dropout inside the Transformer blocks."),
    ("model.emb_dropout", 0.3, "Dropout on history item embeddings."),
    ("model.mixing", "add", "add (DiffuRec Eq. 15) | cross_attention (DiffuRecSys Eq. 16)."),
    ("model.position_embedding", True, "Learned positions, counted from the most recent item."),
    ("model.mask_padding_keys", True, "Attention never attends to padding positions."),
    ("model.mask_padding_queries", False,
     "DiffuRec code: a padding query attends uniformly to all."),
    ("model.causal", False, "Causal self-attention (SASRec always uses it)."),
    ("model.lambda_mean", 0.001, "lambda ~ N(lambda_mean, lambda_std) per element."),
    ("model.lambda_std", 0.001, "Standard deviation of lambda (see lambda_mean)."),
    ("model.diffusion_steps", 32, "T, training schedule length."),
    ("model.schedule", "trunc_lin", "trunc_lin|linear|cosine|sqrt."),
    ("model.item_init_std", 0.02,
     "Item table ~ N(0, std^2); the papers' code: 1.0 (`paper` preset)."),
    ("model.score_scale", 1.0, "Logits = score_scale * x0_hat . E^T (1.0 = the papers)."),
    ("model.reverse_variance", "beta", "beta (DiffuRec code) | posterior (paper Eq. 23)."),
    ("model.block_output_dropout", True, "Dropout on each block's whole output (DiffuRec code)."),
    ("model.layer_norm_eps", 1e-12, "LayerNorm epsilon (DiffuRec code: 1e-12, TF style)."),
    ("model.init", "torch",
     "torch (DiffuRec code: torch defaults + Xavier) | flax (lecun, 0 bias)."),
    ("model.attention_key_bias", False,
     "Key projection bias (cancels in softmax; DiffuRec has one)."),
    ("model.loss_padding_column", False,
     "CE over all N+1 columns, padding included (DiffuRec code)."),
    ("model.cross_attention_form", "dot_product",
     "dot_product|linear|linear_heads (DiffuRecSys code)."),
    ("model.share_cross_attention_norm", False,
     "One LayerNorm before both attentions (DiffuRecSys)."),
    ("model.cross_fill_padding_queries", False,
     "Padding rows of cross-attention := -1e9 (DiffuRecSys)."),
    ("model.every_block_reads_input", False,
     "Blocks all read the input: last one counts (DiffuRecSys)."),
    ("offset_noise.mode", "none", "none|constant|per_example|per_element (training only)."),
    ("offset_noise.delta_c", 1.0, "'constant': eps ~ N(0.1 * delta_c, I)."),
    ("offset_noise.scale", 0.1,
     "eps = N(0, I) + scale * s, s ~ N(0, 1) per example or per element."),
    ("train.batch_size", 1024, "Global batch (divided over devices)."),
    ("train.eval_batch_size", 1024, "Users per evaluation batch (padded, masked)."),
    ("train.learning_rate", 2e-3, "Peak Adam lr (fast recipe, docs/results.md; the papers: 1e-3)."),
    ("train.weight_decay", 0.0, "Adam with L2 added to the gradient, as torch Adam does."),
    ("train.lr_schedule", "cosine",
     "cosine: to 0 at num_epochs | step: x lr_decay_rate every lr_decay_epochs."),
    ("train.warmup_epochs", 0.5,
     "Linear warm-up from 0 over this many epochs (fractions allowed)."),
    ("train.lr_decay_epochs", 0,
     "Step decay: lr *= lr_decay_rate every this many epochs (0 = off)."),
    ("train.lr_decay_rate", 0.1, ""),
    ("train.grad_clip", 0.0, "Global-norm clip (0 = off)."),
    ("train.microbatch_tokens", 32768,
     "Split a step's batch when batch x length exceeds this (0 = never)."),
    ("train.num_epochs", 20,
     "The cosine schedule's length (Toys: best valid at its end, docs/results.md)."),
    ("train.eval_every", 1, "Validate every this many epochs."),
    ("train.patience", 5, "Early stop after this many evaluations without improvement (0 = off)."),
    ("train.valid_metric", "ndcg@10", "Checkpoint selection metric (validation only)."),
    ("train.selection", "metric",
     "metric: best valid_metric | any: any valid metric improves (DiffuRec)."),
    ("train.valid_users", 0, "Validate on a fixed random subset of this many users (0 = all)."),
    ("train.valid_steps", 1,
     "Reverse steps of the validation sampler (0 = sample.steps); test: sample.*."),
    ("train.keep_checkpoints", 2, "Latest checkpoints kept, besides the best."),
    ("train.max_steps_per_epoch", 0, "Cap on steps per epoch (0 = full epoch); for smoke runs."),
    ("train.length_buckets", (4, 8, 16, 32),
     "Extra padded lengths below max_len (needs masked keys)."),
    ("train.mask_history", False, "Evaluation: exclude the user's history items from ranking."),
    ("catalog.block", 0,
     "Score the item table in blocks of this many rows (0 = all N+1 at once)."),
    ("catalog.shards", 1, "Devices the item table's rows are sharded over (mesh axis 'items')."),
    ("catalog.loss", "full", "full: softmax over every item | sampled: in-batch + M negatives."),
    ("catalog.negatives", 1024, "Sampled softmax: M negatives drawn per step (shared by rows)."),
    ("catalog.negative_sampler", "uniform",
     "Sampled softmax: negatives uniform | by popularity (logQ-corrected)."),
    ("sample.sampler", "reverse", "reverse (Algorithm 2) | ddim | one_step (Algorithm 3)."),
    ("sample.steps", 0, "Reverse steps K (respaced); 0 = diffusion_steps."),
    ("sample.seeds", 1, "Ensemble size: item distributions of S chains are averaged."),
    ("sample.eta", 0.0, "DDIM stochasticity (0 = deterministic)."),
    ("sample.seed", 0, "Base seed for inference noise (valid/test reproducible)."),
)


def base_config() -> ml_collections.ConfigDict:
  """`FIELDS` as a ConfigDict: the papers' model, trained with the fast recipe.

  The fast recipe (item table N(0, 0.02^2), Adam lr 2e-3 after a half-epoch warm-up, no
  weight decay, validation every epoch with one reverse step, patience 5) was chosen by
  measurement on Toys (docs/results.md); the `paper` preset restores the published recipe.
  """
  config = ml_collections.ConfigDict()
  for field, default, _ in FIELDS:
    section, _, name = field.rpartition(".")
    if section and section not in config:
      config[section] = ml_collections.ConfigDict()
    (config[section] if section else config)[name] = default
  return config


def _preset_diffurec(config):
  """DiffuRec: additive mixing, batch 512, max_len 50 (the default variant)."""
  config.variant = "diffurec"
  config.model.mixing = "add"
  config.offset_noise.mode = "none"
  config.train.batch_size = 512
  config.data.max_len = 50


def _preset_v1(config):
  """DiffuRecSys V1: cross-attention mixing, batch 1024, max_len 100."""
  config.variant = "v1"
  config.model.mixing = "cross_attention"
  config.offset_noise.mode = "none"
  config.train.batch_size = 1024
  config.data.max_len = 100


def _preset_v2(config):
  """DiffuRecSys V2: V1 + constant offset noise in training."""
  _preset_v1(config)
  config.variant = "v2"
  config.offset_noise.mode = "constant"


def _preset_v1_released(config):
  """DiffuRecSys V1 as its released code runs it (shararezr/DiffuRecSys at 746866d).

  diffurec.py: the cross-attention is linear attention with keys normalised over the heads
  axis, its padding query rows set to -1e9, one LayerNorm shared by both attentions, no block
  output dropout, and every block fed the original input (only the last block counts).
  model.py: no positions, N(0, 1) item table, LayerNorm eps 1e-12, CE over all N+1 columns;
  attention masks built from the query side as in DiffuRec. main.py / training.py: hidden
  256, 4 blocks of 4 heads, max_len 100, batch 512, Adam lr 1e-3 with L2 1e-4, x0.1 after 30
  epochs, 41 epochs, validation every 8 epochs, patience 3, a checkpoint kept when any metric
  improves. See the README table "DiffuRecSys: paper vs released code vs ours".
  """
  _preset_v1(config)
  model = config.model
  model.hidden = 256
  model.num_blocks = 4
  model.num_heads = 4
  model.dropout = 0.1
  model.emb_dropout = 0.3
  model.cross_attention_form = "linear_heads"
  model.share_cross_attention_norm = True
  model.cross_fill_padding_queries = True
  model.every_block_reads_input = True
  _official_code_conventions(model)
  model.block_output_dropout = False  # built in its blocks but never called
  model.lambda_mean = 0.001
  model.lambda_std = 0.001
  model.diffusion_steps = 32
  model.schedule = "trunc_lin"
  config.data.max_len = 100
  train = config.train
  train.batch_size = 512
  train.learning_rate = 1e-3
  train.weight_decay = 1e-4
  train.lr_schedule = "step"
  train.warmup_epochs = 0.0
  train.lr_decay_epochs = 30
  train.lr_decay_rate = 0.1
  train.num_epochs = 41
  train.eval_every = 8
  train.patience = 3
  train.selection = "any"
  train.valid_users = 0
  train.valid_steps = 0
  train.length_buckets = ()


def _preset_v2_released(config):
  """V1 released + the forward noise of the repository's V2 runs: randn + 0.1 * randn.

  That is N(0, 1.01 I) per element, not the paper's N(0.1 * delta_c, I); the latest commit
  (0a68a2a) has it switched off again, which is exactly `v1_released`.
  """
  _preset_v1_released(config)
  config.variant = "v2"
  config.offset_noise.mode = "per_element"
  config.offset_noise.scale = 0.1


def _preset_sasrec(config):
  """SASRec with full cross-entropy (the baseline)."""
  config.variant = "sasrec"
  config.model.causal = True
  config.model.position_embedding = True
  config.model.mask_padding_keys = True
  config.model.hidden = 64
  config.model.num_blocks = 2
  config.model.num_heads = 2
  config.model.dropout = 0.5
  config.model.emb_dropout = 0.5
  config.offset_noise.mode = "none"
  config.train.batch_size = 256
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 0.0
  config.train.lr_schedule = "step"  # Constant (no decay epochs): SASRec's usual recipe.
  config.train.lr_decay_epochs = 0
  config.train.warmup_epochs = 0.0
  config.train.num_epochs = 200
  config.train.patience = 10
  config.data.max_len = 50


def _official_code_conventions(model):
  """The model conventions the DiffuRec code (and the DiffuRecSys code built on it) uses."""
  model.position_embedding = False
  model.mask_padding_keys = False
  model.mask_padding_queries = True
  model.causal = False
  model.block_output_dropout = True
  model.layer_norm_eps = 1e-12
  model.init = "torch"
  model.attention_key_bias = True
  model.loss_padding_column = True
  model.item_init_std = 1.0
  model.score_scale = 1.0
  model.reverse_variance = "beta"


def _preset_upstream(config):
  """DiffuRec's official code, numerically: its model conventions and its training recipe.

  Architecture: no positions, the query-side padding mask, block-output dropout, LayerNorm
  epsilon 1e-12, torch initialisation (N(0, 1) items, key bias), CE over all N+1 columns.
  Recipe (main.py, trainer.py): Adam lr 1e-3, no weight decay, StepLR x0.1 every 100 epochs,
  up to 500 epochs, validation every 20, patience 5 validations, a checkpoint kept when any
  validation metric improves. Evaluation still never ranks the padding item.
  """
  _official_code_conventions(config.model)
  config.data.max_len = 50
  config.train.length_buckets = ()
  _preset_paper(config)
  config.train.selection = "any"


def _preset_paper(config):
  """Each paper's published training recipe, exactly (architecture untouched).

  DiffuRec (main.py): N(0, 1) item table, Adam lr 1e-3, weight decay 0, StepLR x0.1 every 100
  epochs, up to 500 epochs, validation every 20 epochs, patience 5 validations. DiffuRecSys
  (v1/v2): N(0, 1) items, Adam lr 1e-3, weight decay 1e-4, x0.1 from epoch 30, 41 epochs (its
  batch 1024 / max_len 100 come with the variant preset).
  """
  config.model.item_init_std = 1.0
  train = config.train
  train.learning_rate = 1e-3
  train.lr_schedule = "step"
  train.warmup_epochs = 0.0
  train.lr_decay_rate = 0.1
  train.valid_users = 0
  train.valid_steps = 0
  if config.variant in ("v1", "v2"):
    # DiffuRecSys Sec. 6.2: Adam lr 1e-3, weight decay 1e-4, lr x0.1 from epoch 30, 41 epochs
    # (validation schedule not stated: every epoch, patience 10).
    train.weight_decay = 1e-4
    train.lr_decay_epochs = 30
    train.num_epochs = 41
    train.eval_every = 1
    train.patience = 10
  else:
    train.weight_decay = 0.0
    train.lr_decay_epochs = 100
    train.num_epochs = 500
    train.eval_every = 20
    train.patience = 5


def _preset_nopos(config):
  """Ablation: no position embedding."""
  config.model.position_embedding = False


def _preset_lambda0(config):
  """Ablation: lambda = 0 (no diffusion signal in the history)."""
  config.model.lambda_mean = 0.0
  config.model.lambda_std = 0.0


def _preset_steps1(config):
  """One reverse step at inference."""
  config.sample.steps = 1


def _preset_smoke(config):
  """Tiny and fast: a slice of the real data, small model, few steps."""
  config.data.max_users = 400
  config.data.max_len = 20
  config.model.hidden = 32
  config.model.num_blocks = 2
  config.model.num_heads = 2
  config.train.batch_size = 64
  config.train.eval_batch_size = 128
  config.train.num_epochs = 3
  config.train.max_steps_per_epoch = 20
  config.train.patience = 0
  config.train.length_buckets = (8,)


PRESETS = {
    "diffurec": _preset_diffurec,
    "v1": _preset_v1,
    "v2": _preset_v2,
    "sasrec": _preset_sasrec,
    "v1_released": _preset_v1_released,
    "v2_released": _preset_v2_released,
    "upstream": _preset_upstream,
    "paper": _preset_paper,
    "nopos": _preset_nopos,
    "lambda0": _preset_lambda0,
    "steps1": _preset_steps1,
    "smoke": _preset_smoke,
}


def apply_presets(config: ml_collections.ConfigDict, arg: str | None, *,
                  dataset_defaults=None):
  """Applies the comma-separated presets in `arg` (e.g. 'v2,smoke') in order.

  The variant preset goes first (default: diffurec), then `dataset_defaults(config, variant)`
  where a dataset file gives one (e.g. ML-1M's longer histories), then the other presets, so
  `smoke` or `upstream` still set their own values.
  """
  names = [name.strip() for name in (arg or "").split(",") if name.strip()]
  unknown = [name for name in names if name not in PRESETS]
  if unknown:
    raise errors.ConfigError(
        f"Unknown preset(s) {unknown} in ':{arg}'; known presets: {sorted(PRESETS)}.")
  variants = [name for name in names if name in VARIANTS + RELEASED_VARIANTS]
  if len(variants) > 1:
    raise errors.ConfigError(f"Choose one variant preset, got {variants}.")
  # The variant sets its paper's defaults first; the other presets refine them.
  variant = variants[0] if variants else "diffurec"
  PRESETS[variant](config)
  if dataset_defaults is not None:
    dataset_defaults(config, variant)
  for name in names:
    if name not in variants:
      PRESETS[name](config)
  return config
