"""Full-ranking evaluation: one Evaluator per (config, dataset), and a trained workdir's.

Every user is scored against all items (padding excluded), ranks are pessimistic on ties,
HR/NDCG/MRR@K are averaged over users (sums and counts, divided once on the host). One
compiled function per bucket length; the noise of each user's chain is keyed by the user id,
so results do not depend on batch size, bucketing or device count. In a multi-process run
every process evaluates its rows of each batch; the metric sums are over the global batch and
the ranks are gathered from every process, so every process returns the same full result.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from diffurec_jax import catalog
from diffurec_jax import metrics
from diffurec_jax import samplers
from diffurec_jax import sharding
from diffurec_jax.data import batches as batches_lib
from diffurec_jax.data import splits
from diffurec_jax.models import bundle as bundle_lib
from diffurec_jax.models import diffurec as model_lib
from diffurec_jax.training import checkpoints as checkpoint_lib
from diffurec_jax.training import optimizer as optimizer_lib
from diffurec_jax.training import state as train_state
from diffurec_jax.training import workdir as workdir_lib


def make_eval_step(config):
  """jit(bundle, batch, key, schedule) -> (metric sums, ranks [B])."""
  mask_history = config.train.mask_history
  block = catalog.block_size(config.catalog.block, config.catalog.shards)
  if block:
    return _blockwise_eval_step(config, block, mask_history)
  scorer = samplers.make_scorer(config)

  def eval_step(bundle, batch, key, schedule):
    log_probs = scorer(bundle, batch["history"], batch["users"], key, schedule)
    history = batch["history"] if mask_history else None
    sums, ranks = metrics.evaluate_batch(log_probs, batch["targets"], batch["weights"], history)
    return sums, ranks

  return jax.jit(eval_step)


def _blockwise_eval_step(config, block: int, mask_history: bool):
  """The same sums and ranks with the items scored in blocks (catalog.py): no [B, N+1]."""
  queries = samplers.make_queries(config)

  def eval_step(bundle, batch, key, schedule):
    x = queries(bundle, batch["history"], batch["users"], key, schedule)
    model = bundle_lib.merge(bundle)
    spec = catalog.Spec(model.num_items, block, getattr(model, "score_scale", 1.0))
    history = batch["history"] if mask_history else None
    ranks, _, _ = catalog.ranks_and_top_k(x, model_lib.item_table(bundle),
                                          batch["targets"], spec, history)
    return metrics.metric_sums(ranks, batch["weights"]), ranks

  return jax.jit(eval_step)


def user_subset(num_users: int, max_users: int, seed: int) -> np.ndarray | None:
  """A fixed random subset of `max_users` of `num_users` users, sorted (None = all users)."""
  if not max_users or max_users >= num_users:
    return None
  return np.sort(np.random.default_rng(seed).choice(num_users, max_users, replace=False))


def validation_config(config):
  """The config validation runs with: `train.valid_steps` reverse steps (0 = sample.steps)."""
  if not config.train.valid_steps:
    return config
  valid_config = config.copy_and_resolve_references()
  valid_config.sample.steps = config.train.valid_steps
  return valid_config


class Evaluator:
  """Full-ranking evaluation of `dataset`'s splits under one config, on one mesh.

  The jitted step is built once: validation every epoch and the final test reuse its
  compiled bucket shapes. `evaluate` builds batches as it goes (with a progress bar); a
  benchmark builds them first with `batches` and times `evaluate_batches` alone.
  """

  def __init__(self, config, dataset, mesh):
    self.config, self.dataset, self.mesh = config, dataset, mesh
    self.step = sharding.under_mesh(make_eval_step(config), mesh)
    self.schedule = samplers.sampling_schedule(config)
    self.lengths = batches_lib.padded_lengths(config)

  def examples(self, split: str, max_users: int = 0, subset_seed: int | None = None
               ) -> splits.Examples:
    """The split's examples; `max_users` > 0: a fixed random subset (seed: sample.seed)."""
    examples = splits.eval_examples(self.dataset, split)
    seed = self.config.sample.seed if subset_seed is None else subset_seed
    subset = user_subset(len(examples.users), max_users, seed)
    return examples if subset is None else examples.take(subset)

  def plans(self, examples: splits.Examples) -> list:
    history_lengths = (examples.ends - examples.starts).astype(np.int64)
    return batches_lib.eval_plan(history_lengths, self.config.train.eval_batch_size,
                                 self.lengths)

  def batch(self, plan, examples: splits.Examples) -> dict:
    return sharding.shard_batch(batches_lib.build(plan, examples, self.dataset.items),
                                self.mesh)

  def batches(self, examples: splits.Examples) -> list:
    """[(plan, sharded batch)] of every batch, built before any is evaluated."""
    return [(plan, self.batch(plan, examples)) for plan in self.plans(examples)]

  def key(self, seed: int | None = None) -> jax.Array:
    return jax.random.key(self.config.sample.seed if seed is None else seed)

  def evaluate(self, bundle, split: str, *, max_users: int = 0,
               progress: bool = True) -> tuple[dict, dict]:
    """Metrics of `split` ('valid' | 'test') and per-user arrays (users, ranks, lengths).

    `max_users` > 0 evaluates a fixed random subset of that many users (seeded by
    sample.seed, the same subset every time); the test split always uses every user.
    """
    examples = self.examples(split, max_users)
    history_lengths = (examples.ends - examples.starts).astype(np.int64)
    key = self.key()
    bundle = place(bundle, self.mesh)
    totals = {}
    ranks = np.zeros(len(history_lengths), dtype=np.int64)
    start = time.time()
    for plan in tqdm(self.plans(examples), desc=split, disable=not progress, leave=False):
      output = self.step(bundle, self.batch(plan, examples), key, self.schedule)
      totals = _collect(totals, ranks, plan, _to_host(output))
    result = metrics.finalize(totals)
    result["seconds"] = round(time.time() - start, 3)
    per_user = {"users": examples.users, "targets": examples.targets, "ranks": ranks,
                "history_lengths": history_lengths}
    return result, per_user

  def warm_up(self, bundle, batches) -> float:
    """Seconds of one call per distinct batch shape (compilation plus one batch each)."""
    start = time.perf_counter()
    shapes = {batch["history"].shape: batch for _, batch in batches}
    jax.block_until_ready([self.step(bundle, batch, self.key(0), self.schedule)
                           for batch in shapes.values()])
    return time.perf_counter() - start

  def evaluate_batches(self, bundle, batches, key) -> tuple[dict, np.ndarray, float]:
    """(metrics, ranks [num examples], seconds): every batch dispatched, then one sync."""
    start = time.perf_counter()
    outputs = [self.step(bundle, batch, key, self.schedule) for _, batch in batches]
    jax.block_until_ready(outputs)
    seconds = time.perf_counter() - start
    totals = {}
    ranks = np.zeros(sum(int((plan.indices >= 0).sum()) for plan, _ in batches), np.int64)
    for (plan, _), output in zip(batches, _to_host(outputs)):
      totals = _collect(totals, ranks, plan, output)
    return metrics.finalize(totals), ranks, seconds


def place(bundle, mesh):
  """`bundle` ready for steps on `mesh`: with an 'items' axis the item table's rows go to their
  devices (sharding.replicate); otherwise it is returned as it is (jit places it)."""
  if mesh is None or sharding.item_shards(mesh) <= 1:
    return bundle
  return bundle_lib.Bundle(bundle.graphdef, sharding.replicate(bundle.params, mesh))


def _to_host(outputs):
  """Host copies of eval-step outputs. In a multi-process run a process holds only its own
  rows of the ranks [B]: they are gathered from every process (the sums are replicated)."""
  if jax.process_count() == 1:
    return jax.device_get(outputs)
  return multihost_utils.process_allgather(outputs, tiled=True)


def _collect(totals: dict, ranks: np.ndarray, plan, output) -> dict:
  """Adds one batch's (metric sums, ranks [B]) on the host: sums to `totals` (returned),
  the ranks of its real rows into `ranks` at their example indices (padded rows dropped)."""
  sums, batch_ranks = output
  valid = plan.indices >= 0
  ranks[plan.indices[valid]] = np.asarray(batch_ranks)[valid]
  return metrics.accumulate(totals, sums)


@dataclasses.dataclass
class Loaded:
  """A trained workdir's best checkpoint: its config, parameters and id maps."""
  config: object
  bundle: bundle_lib.Bundle
  user_ids: np.ndarray
  item_ids: np.ndarray
  epoch: int


def load(workdir: str, *, seeds: int = 0, steps: int = 0, sampler: str = "",
         lambda_zero: bool = False) -> Loaded:
  """The best checkpoint of `workdir` with its config; seeds/steps/sampler override sampling;
  lambda_zero: lambda = 0 at inference (the noised x_t never reaches the approximator)."""
  config = workdir_lib.load_config(workdir)
  if lambda_zero:
    config.model.lambda_mean, config.model.lambda_std = 0.0, 0.0
  if seeds:
    config.sample.seeds = seeds
  if steps:
    config.sample.steps = steps
  if sampler:
    config.sample.sampler = sampler
  user_ids, item_ids = workdir_lib.load_id_map(workdir)
  bundle = train_state.init_model(config, len(item_ids) - 1)
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  try:
    if checkpoints.best.latest_step() is None:
      raise checkpoint_lib.CheckpointError(
          f"{workdir} has no validated checkpoint under {checkpoints.directory}/best; train it "
          "first with bin/train.py.")
    tx = optimizer_lib.make_optimizer(config.train, 1)
    target = train_state.TrainState(bundle.params, tx.init(bundle.params),
                                    jnp.zeros((), jnp.int32))
    if jax.device_count() > 1:  # Restored onto the mesh evaluation shards batches over: a
      # restored array is committed to its devices, and moving it to other processes' devices
      # is a transfer the backends refuse (and jit refuses params on one device of several).
      target = sharding.replicate(target, sharding.make_mesh(config.catalog.shards))
    state, meta = checkpoints.restore("best", target)
  finally:
    checkpoints.close()
  return Loaded(config, bundle_lib.Bundle(bundle.graphdef, state.params), user_ids, item_ids,
                meta["best_epoch"])


def load_with_data(workdir: str, **overrides) -> tuple[Loaded, object]:
  """(Loaded, its prepared dataset); CheckpointError if the data changed since training."""
  from diffurec_jax import data as data_lib
  loaded = load(workdir, **overrides)
  dataset = data_lib.prepare(loaded.config.data)
  if dataset.num_items != len(loaded.item_ids) - 1:
    raise checkpoint_lib.CheckpointError(
        f"The prepared data has {dataset.num_items} items but {workdir} was trained on "
        f"{len(loaded.item_ids) - 1}; the raw data changed since training.")
  return loaded, dataset


def evaluate_workdir(workdir: str, split: str = "test", *, seeds: int = 0, steps: int = 0,
                     sampler: str = "", lambda_zero: bool = False,
                     progress: bool = True) -> tuple[dict, dict, Loaded]:
  """(metrics, per-user arrays, Loaded) of `workdir`'s best checkpoint on `split`, exactly as
  training computed them; seeds/steps/sampler/lambda_zero override the run's sampling."""
  loaded, dataset = load_with_data(workdir, seeds=seeds, steps=steps, sampler=sampler,
                                   lambda_zero=lambda_zero)
  mesh = sharding.make_mesh(loaded.config.catalog.shards)
  sharding.check_batch_size(loaded.config.train.eval_batch_size, mesh,
                            "train.eval_batch_size")
  result, per_user = Evaluator(loaded.config, dataset, mesh).evaluate(
      loaded.bundle, split, progress=progress)
  return result, per_user, loaded
