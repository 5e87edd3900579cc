"""Training-mode checks of bench/parity_upstream.py: dropout sites, initial parameter
distributions, the optimizer step and the learning-rate schedule, ours against the official
PyTorch modules (imported by parity_upstream.py; torch is needed)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from diffurec_jax.models import attention
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.training import optimizer as optimizer_lib
from diffurec_jax.training import state as train_state

from upstream_code import upstream_args

def relative_difference(a, b, rows=None) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float64)
  if rows is not None and a.ndim and a.shape[0] == rows.shape[0]:
    a, b = a[rows], b[rows]
  scale = max(np.abs(b).max(), 1e-30)
  return float(np.abs(a - b).max() / scale)


def dropout_sites(config, args, upstream_model_module, upstream_diffurec_module):
  """(ours, official) number of dropout applications in one training-mode forward."""
  import torch

  official_model = upstream_model_module.Att_Diffuse_model(
      upstream_diffurec_module.DiffuRec(upstream_args(config, args.num_items)),
      upstream_args(config, args.num_items))
  official_model.train()
  calls = []
  for module in official_model.modules():
    if isinstance(module, torch.nn.Dropout) and module.p > 0:
      module.register_forward_hook(lambda *unused: calls.append(1))
  history = torch.randint(1, args.num_items + 1, (2, args.max_len))
  official_model(history, torch.randint(1, args.num_items + 1, (2, 1)), train_flag=True)

  count = []
  real = attention.dropout

  def counting(x, rate, key):
    if key is not None and rate > 0:
      count.append(1)
    return real(x, rate, key)

  bundle = train_state.init_model(config, args.num_items)
  attention.dropout = counting
  try:
    model_lib.denoise(bundle, jnp.asarray(history.numpy(), jnp.int32),
                      jnp.zeros((2, args.hidden)), jnp.zeros((2,), jnp.int32),
                      jax.random.key(0), train=True)
  finally:
    attention.dropout = real
  return len(count), len(calls)


def init_statistics(config, args, upstream_model_module, upstream_diffurec_module):
  """Rows (parameter, our std, official std, our max|w|, official max|w|) at initialisation."""
  import torch

  torch.manual_seed(args.seed)
  official_model = upstream_model_module.Att_Diffuse_model(
      upstream_diffurec_module.DiffuRec(upstream_args(config, args.num_items)),
      upstream_args(config, args.num_items))
  mine = bundle_lib.merge(train_state.init_model(config, args.num_items))
  block, theirs_block = mine.approximator.blocks[0], official_model.diffu.xstart_model.att.transformer_blocks[0]
  pairs = [
      ("item table", mine.item_embedding[...], official_model.item_embeddings.weight),
      ("attention query W", block.attention.query.kernel[...],
       theirs_block.attention.linear_layers[0].weight),
      ("attention query b", block.attention.query.bias[...],
       theirs_block.attention.linear_layers[0].bias),
      ("attention out W (Xavier)", block.attention.out.kernel[...],
       theirs_block.attention.w_layer.weight),
      ("feed-forward inner W (Xavier)", block.ffn.inner.kernel[...],
       theirs_block.feed_forward.w_1.weight),
      ("feed-forward inner b", block.ffn.inner.bias[...], theirs_block.feed_forward.w_1.bias),
      ("step MLP W", mine.step_inner.kernel[...],
       official_model.diffu.xstart_model.time_embed[0].weight),
  ]
  rows = []
  for name, a, b in pairs:
    a, b = np.asarray(a), b.detach().numpy()
    rows.append((name, a.std(), b.std(), np.abs(a).max(), np.abs(b).max()))
  return rows


def optimizer_check(config):
  """(max relative difference of 3 Adam steps, lr pairs at epochs) ours vs torch."""
  import optax
  import torch

  rng = np.random.default_rng(0)
  start = rng.standard_normal((64,)).astype(np.float32)
  grads = [rng.standard_normal((64,)).astype(np.float32) for _ in range(3)]
  steps_per_epoch = 1
  tx = optimizer_lib.make_optimizer(config.train, steps_per_epoch)
  params = jnp.asarray(start)
  state = tx.init(params)
  for grad in grads:
    updates, state = tx.update(jnp.asarray(grad), state, params)
    params = optax.apply_updates(params, updates)
  weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
  optimizer = torch.optim.Adam([weight], lr=config.train.learning_rate,
                               weight_decay=config.train.weight_decay)
  for grad in grads:
    weight.grad = torch.from_numpy(grad.copy())
    optimizer.step()
  adam = relative_difference(params, weight.detach().numpy())
  schedule = optimizer_lib.learning_rate_schedule(config.train, steps_per_epoch)
  weight = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.Adam([weight], lr=config.train.learning_rate)
  step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.1)
  torch_lrs = []
  for epoch in range(301):
    torch_lrs.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    step_lr.step()
  lrs = [(epoch, float(schedule(epoch)), torch_lrs[epoch]) for epoch in (0, 99, 100, 199, 200, 300)]
  return adam, lrs
