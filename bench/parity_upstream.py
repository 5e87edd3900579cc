"""Numerical parity with the official PyTorch DiffuRec (optional; needs torch, never in CI).

  python bench/parity_upstream.py --upstream PATH/TO/DiffuRec/src [--batch 16] [--hidden 128]

Builds our model with the `upstream` preset, copies its weights into the official modules
(imported from --upstream, read-only), feeds both the same histories (half of them
left-padded), x_t, t, lambda and noise, and prints, per quantity, the relative difference
max|ours - official| / max|official| over padded and unpadded rows. Exit 0 when every
`upstream` quantity is within --tolerance (1e-5). Then it repeats the comparison for the
default model with the same weights, to show where (and why) the default differs, and checks
the training-mode conventions: the dropout sites, the initial parameter distributions, the
optimizer step and the learning-rate schedule.

torch is an optional extra: pip install -e '.[parity]'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax.numpy as jnp
import numpy as np

from diffurec_jax import config as config_lib
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax import diffusion
from diffurec_jax.training import state as train_state

import parity_training  # bench/: the training-mode checks and shared helpers
from parity_training import relative_difference
from upstream_code import import_upstream, upstream_args

# Why the default model differs from the official code (printed beside its differences).
DEFAULT_REASONS = {
    "embedded history": "positions: learned, counted from the most recent item",
    "x0_hat": "positions + padding keys masked (official: query-side mask)",
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--upstream", required=True,
                      help="folder holding the official diffurec.py and model.py")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--max_len", type=int, default=50)
  parser.add_argument("--num_items", type=int, default=1000)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--num_blocks", type=int, default=4)
  parser.add_argument("--item_init_std", type=float, default=1.0,
                      help="std of the item table both models get (1.0 = torch default)")
  parser.add_argument("--tolerance", type=float, default=1e-5)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def make_config(preset: str, args):
  config = config_lib.base_config()
  config_lib.apply_presets(config, preset)
  config.data.max_len = args.max_len
  config.model.hidden = args.hidden
  config.model.num_blocks = args.num_blocks
  config.model.num_heads = 4  # the official Transformer hard-codes 4 heads
  config.model.item_init_std = args.item_init_std
  return config


def copy_weights(bundle, official):
  """Our parameters -> the official Att_Diffuse_model's tensors (in place)."""
  import torch

  mine = bundle_lib.merge(bundle)

  def put(tensor, value):
    with torch.no_grad():
      tensor.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(value), dtype=np.float32)))

  def linear(ours_linear, module):
    put(module.weight, np.asarray(ours_linear.kernel[...]).T)
    if ours_linear.bias is not None:
      put(module.bias, ours_linear.bias[...])
    else:  # our default has no key bias: softmax over keys cancels it exactly
      put(module.bias, np.zeros(module.bias.shape))

  def norm(ours_norm, module):
    put(module.weight, ours_norm.scale[...])
    put(module.bias, ours_norm.bias[...])

  put(official.item_embeddings.weight, mine.item_embedding[...])
  norm(mine.embedding_norm, official.LayerNorm)
  xstart = official.diffu.xstart_model
  linear(mine.step_inner, xstart.time_embed[0])
  linear(mine.step_outer, xstart.time_embed[2])
  norm(mine.approximator.final_norm, xstart.norm_diffu_rep)
  for block, theirs in zip(mine.approximator.blocks, xstart.att.transformer_blocks):
    for which, name in enumerate(("query", "key", "value")):
      linear(getattr(block.attention, name), theirs.attention.linear_layers[which])
    linear(block.attention.out, theirs.attention.w_layer)
    norm(block.attention_norm, theirs.input_sublayer.norm)
    norm(block.ffn_norm, theirs.output_sublayer.norm)
    linear(block.ffn.inner, theirs.feed_forward.w_1)
    linear(block.ffn.outer, theirs.feed_forward.w_2)


@contextlib.contextmanager
def scripted_randomness(normals, randns):
  """Makes torch.normal / torch.randn_like return the given arrays, in order."""
  import torch

  normals, randns = list(normals), list(randns)
  real_normal, real_randn_like = torch.normal, torch.randn_like

  def fake_normal(*args, mean=None, std=None, **kwargs):
    expected = tuple(mean.shape) if mean is not None else None
    value = normals.pop(0)
    assert expected is None or expected == value.shape, (expected, value.shape)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

  def fake_randn_like(tensor, **kwargs):
    value = randns.pop(0)
    assert tuple(tensor.shape) == value.shape, (tensor.shape, value.shape)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

  torch.normal, torch.randn_like = fake_normal, fake_randn_like
  try:
    yield
  finally:
    torch.normal, torch.randn_like = real_normal, real_randn_like
  assert not normals and not randns, "the official code drew fewer numbers than scripted"


def make_inputs(args, config, rng):
  """Histories (every other row left-padded), targets, x_t, t, lambdas, chain noise."""
  batch, length, hidden = args.batch, args.max_len, args.hidden
  steps = config.model.diffusion_steps
  history = rng.integers(1, args.num_items + 1, size=(batch, length))
  padded = np.arange(batch) % 2 == 0
  for row in np.flatnonzero(padded):
    history[row, : rng.integers(1, length - 1)] = 0
  lam = lambda shape: config.model.lambda_mean + config.model.lambda_std * rng.standard_normal(
      shape)
  return dict(
      history=history.astype(np.int32), padded=padded,
      targets=rng.integers(1, args.num_items + 1, size=batch).astype(np.int32),
      x_t=rng.standard_normal((batch, hidden)).astype(np.float32),
      t=rng.integers(0, steps, size=batch).astype(np.int32),
      lambdas=lam((batch, length, hidden)).astype(np.float32),
      x_start=rng.standard_normal((batch, hidden)).astype(np.float32),
      chain_lambdas=lam((steps, batch, length, hidden)).astype(np.float32),
      chain_noise=rng.standard_normal((steps, batch, hidden)).astype(np.float32))


def ours(config, bundle, inputs):
  """Every compared quantity from our library, in evaluation mode."""
  model = bundle_lib.merge(bundle)
  schedule = diffusion.make_schedule(config.model.schedule, config.model.diffusion_steps)
  history = jnp.asarray(inputs["history"])
  e, key_mask = model.embed_history(history)
  x_t, t = jnp.asarray(inputs["x_t"]), jnp.asarray(inputs["t"])
  x0_hat = model.approximate(e, key_mask, x_t, t, jnp.asarray(inputs["lambdas"]))
  table = model_lib.item_table(bundle)
  logits = model_lib.score(x0_hat, table, keep_padding=True)
  loss_logits = model_lib.score(x0_hat, table, keep_padding=config.model.loss_padding_column)
  targets = jnp.asarray(inputs["targets"])
  loss = model_lib.weighted_cross_entropy(loss_logits, targets, jnp.ones(targets.shape))
  x0 = table[targets]
  q = diffusion.q_sample(schedule, x0, t, jnp.asarray(inputs["chain_noise"][0]))
  one = diffusion.reverse_step(schedule, x0_hat, x_t, t, jnp.asarray(inputs["chain_noise"][0]),
                                  config.model.reverse_variance)
  x = jnp.asarray(inputs["x_start"])
  steps = config.model.diffusion_steps
  for index, step in enumerate(range(steps - 1, -1, -1)):
    t_step = jnp.full((x.shape[0],), step, jnp.int32)
    x_hat = model.approximate(e, key_mask, x, t_step, jnp.asarray(inputs["chain_lambdas"][index]))
    x = diffusion.reverse_step(schedule, x_hat, x, t_step,
                                  jnp.asarray(inputs["chain_noise"][index]),
                                  config.model.reverse_variance)
  chain_scores = model_lib.score(x, table, keep_padding=True)
  return {"embedded history": e, "x0_hat": x0_hat, "logits": logits, "loss": loss,
          "q_sample": q, "one reverse step": one, "32-step chain x0": x,
          "chain scores": chain_scores}


def official(official_model, config, inputs):
  """The same quantities from the official modules, evaluation mode, scripted randomness."""
  import torch

  official_model.eval()
  diffu = official_model.diffu
  steps = config.model.diffusion_steps
  history = torch.from_numpy(inputs["history"].astype(np.int64))
  mask = (history > 0).float()
  x_t = torch.from_numpy(inputs["x_t"])
  t = torch.from_numpy(inputs["t"].astype(np.int64))
  targets = torch.from_numpy(inputs["targets"].astype(np.int64))
  with torch.no_grad():
    e = official_model.LayerNorm(official_model.embed_dropout(
        official_model.item_embeddings(history)))
    with scripted_randomness([inputs["lambdas"]], []):
      x0_hat, _ = diffu.xstart_model(e, x_t, diffu._scale_timesteps(t), mask)
    logits = official_model.diffu_rep_pre(x0_hat)
    loss = official_model.loss_diffu_ce(x0_hat, targets[:, None])
    x0 = official_model.item_embeddings(targets)
    q = diffu.q_sample(x0, t, noise=torch.from_numpy(inputs["chain_noise"][0]))
    with scripted_randomness([inputs["lambdas"]], [inputs["chain_noise"][0]]):
      one = diffu.p_sample(e, x_t, t, mask)
    # The whole evaluation forward: embedding, x_T ~ randn, the 32-step reverse chain.
    with scripted_randomness(list(inputs["chain_lambdas"]),
                             [inputs["x_start"]] + list(inputs["chain_noise"])):
      _, x, *_ = official_model(history, targets[:, None], train_flag=False)
    chain_scores = official_model.diffu_rep_pre(x)
  assert steps == diffu.num_timesteps
  return {"embedded history": e, "x0_hat": x0_hat, "logits": logits, "loss": loss,
          "q_sample": q, "one reverse step": one, "32-step chain x0": x,
          "chain scores": chain_scores}


def compare(config, args, upstream_model_module, upstream_diffurec_module, params_seed):
  """Rows (quantity, padded diff, unpadded diff) for `config` with shared weights."""
  bundle = train_state.init_model(config, args.num_items)
  official_model = upstream_model_module.Att_Diffuse_model(
      upstream_diffurec_module.DiffuRec(upstream_args(config, args.num_items)),
      upstream_args(config, args.num_items))
  copy_weights(bundle, official_model)
  inputs = make_inputs(args, config, np.random.default_rng(params_seed))
  mine, theirs = ours(config, bundle, inputs), official(official_model, config, inputs)
  padded = inputs["padded"]
  rows = []
  for name in mine:
    if name == "loss":
      rows.append((name, relative_difference(mine[name], theirs[name]), None))
      continue
    rows.append((name, relative_difference(mine[name], theirs[name], padded),
                 relative_difference(mine[name], theirs[name], ~padded)))
  top_ours = np.argsort(-np.asarray(mine["chain scores"])[:, 1:], axis=1)[:, :10]
  top_theirs = np.argsort(-theirs["chain scores"].numpy()[:, 1:], axis=1)[:, :10]
  return rows, float((top_ours == top_theirs).all(axis=1).mean())


def main(argv=None) -> int:
  args = parse_args(argv)
  upstream_diffurec, upstream_model = import_upstream(args.upstream)
  import torch

  torch.set_num_threads(max(os.cpu_count() or 1, 1))
  print(f"official code: {args.upstream}")
  print(f"batch {args.batch} (every other row left-padded), max_len {args.max_len}, "
        f"{args.num_items} items, hidden {args.hidden}, {args.num_blocks} blocks; relative "
        "difference = max|ours - official| / max|official|\n")
  failed = []
  for preset in ("upstream", "diffurec"):
    config = make_config(preset, args)
    rows, top10 = compare(config, args, upstream_model, upstream_diffurec, args.seed)
    title = "upstream preset" if preset == "upstream" else "default model (same weights)"
    print(f"== {title}")
    print(f"{'quantity':<20} {'padded rows':>12} {'unpadded rows':>14}  status")
    for name, padded, unpadded in rows:
      worst = max(padded, unpadded if unpadded is not None else 0.0)
      ok = worst <= args.tolerance
      if preset == "upstream":
        status = "ok" if ok else "DIFFERS"
        if not ok:
          failed.append(name)
      else:
        status = "same" if ok else "differs: " + DEFAULT_REASONS.get(
            name, "follows from the differences above")
      unpadded_text = f"{unpadded:14.2e}" if unpadded is not None else f"{'(batch)':>14}"
      print(f"{name:<20} {padded:12.2e} {unpadded_text}  {status}")
    print(f"{'top-10 lists equal':<20} {top10:12.0%} of users\n")

  config = make_config("upstream", args)
  ours_sites, official_sites = parity_training.dropout_sites(
      config, args, upstream_model, upstream_diffurec)
  print(f"dropout sites in one training forward: ours {ours_sites}, official {official_sites}"
        f"  {'ok' if ours_sites == official_sites else 'DIFFERS'}")
  if ours_sites != official_sites:
    failed.append("dropout sites")
  print("\ninitial parameters (upstream preset; std and max|w|, ours vs official):")
  for name, std_a, std_b, max_a, max_b in parity_training.init_statistics(
      config, args, upstream_model, upstream_diffurec):
    ok = abs(std_a / std_b - 1) < 0.1 and abs(max_a / max_b - 1) < 0.25
    print(f"  {name:<30} std {std_a:.4f} / {std_b:.4f}  max {max_a:.4f} / {max_b:.4f}"
          f"  {'ok' if ok else 'DIFFERS'}")
    if not ok:
      failed.append(f"init {name}")
  adam, lrs = parity_training.optimizer_check(config)
  print(f"\nAdam (lr {config.train.learning_rate}, weight decay {config.train.weight_decay}), "
        f"3 steps: relative difference {adam:.2e}  {'ok' if adam <= args.tolerance else 'DIFFERS'}")
  if adam > args.tolerance:
    failed.append("adam")
  for epoch, mine, theirs in lrs:
    ok = np.isclose(mine, theirs, rtol=1e-6)
    print(f"  lr at epoch {epoch:3d}: ours {mine:.2e}, official StepLR {theirs:.2e}"
          f"  {'ok' if ok else 'DIFFERS'}")
    if not ok:
      failed.append(f"lr epoch {epoch}")
  print(f"\nselection: train.selection={config.train.selection!r} (a checkpoint whenever any "
        f"validation metric improves, as trainer.py); patience {config.train.patience} "
        f"validations every {config.train.eval_every} epochs, up to {config.train.num_epochs}.")
  if failed:
    print(f"\nNOT at parity: {', '.join(failed)}")
    return 1
  print(f"\nupstream preset: every quantity within {args.tolerance:g} of the official code.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
