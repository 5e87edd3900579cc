"""The item catalog scored in blocks and across devices: cross-entropy, ranks, top-K, lookups.

The dense path scores a batch against the whole table at once ([B, N+1] logits). Here the table
is visited in blocks of `block` rows inside a `lax.scan` (each block's [.., B, block] scores are
recomputed in the backward pass), so peak memory is O(B x block), never O(B x N); and on a mesh
whose 'items' axis has more than one device the table's rows are sharded over that axis: each
device visits only its own rows and one collective combines the partial results (max and sum
for the log-sum-exp, a sum for ranks and lookups, a merge for top-K). The sampled softmax that
approximates the full one in training is sampled_softmax.py.

Shapes: table [R, H] with row 0 the padding item and rows >= N+1 (padding added so that R
divides over the devices) never scored; queries x [B, H] or [S, B, H] (S ensemble chains);
targets [B] int32 in 1..N; history [B, L] int32 (0 = padding).

Item ids are global row numbers; a block is `lax.dynamic_slice`d from the table (the last block
clamped to the end, its already-visited rows masked), so the table is never copied or padded
per call. Everything equals the dense computation up to float summation order; ranks and top-K
ids follow the same rules (ties pessimistic, NaN never helps, padding never ranked).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "items"  # The mesh axis that shards the table's rows.


class Spec(NamedTuple):
  """How the catalog is scored (static). block 0 = the dense path (models/diffurec.score)."""
  num_items: int  # N: items 1..N are real.
  block: int = 0
  scale: float = 1.0  # logits = scale * x . E^T


def table_rows(num_items: int, shards: int) -> int:
  """Rows of the item table: N+1, rounded up to a multiple of `shards` when sharded."""
  rows = num_items + 1
  return rows if shards <= 1 else -(-rows // shards) * shards


def block_size(block: int, shards: int) -> int:
  """The block the catalog functions use: `block`; with a sharded table and block 0, each
  device's rows in one block; 0 (the dense path) when neither is asked for."""
  return block if block > 0 else (WHOLE if shards > 1 else 0)


WHOLE = 1 << 40  # A block larger than any table: min(block, rows) visits all rows at once.


def item_shards(mesh=None) -> int:
  """Devices on the 'items' axis of `mesh` (default: the mesh set by `jax.set_mesh`), or 1."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or getattr(mesh, "empty", False) or AXIS not in mesh.axis_names:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes))[AXIS]


ROWS, ALL = P(AXIS), P()  # shard_map specs: the table's rows; whole along 'items'.


def _sharded(function, in_specs, out_specs):
  """shard_map manual over the 'items' axis only: `function` sees its device's rows of the
  table and the whole of every other argument along 'items'. The 'data' axis stays automatic
  (jit shards the batch over it as outside). The compiled 2 x 2 step then has one table-sized
  collective, an all-reduce per block of the loss's scan. Manual over 'data' too, each use
  of the table (loss, history and target lookups) all-reduced its own gradient: three per
  step, and with one data device three trivial ones that still held three gradient-sized
  buffers (tests/test_catalog.py counts the temporaries).
  """
  return jax.shard_map(function, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                       out_specs=out_specs, axis_names={AXIS}, check_vma=False)


def _offset(rows: int, sharded: bool) -> jax.Array:
  return jax.lax.axis_index(AXIS) * rows if sharded else jnp.zeros((), jnp.int32)


# ---- lookups -----------------------------------------------------------------------------

def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """table[ids]: ids [...] int32 -> [..., H]; with a sharded table each device gathers the
  rows it holds (zeros elsewhere) and a sum over 'items' assembles them."""
  if item_shards() <= 1:
    return table[ids]

  def local(table_shard, ids):
    rows = table_shard.shape[0]
    where = ids - _offset(rows, True)
    mine = (where >= 0) & (where < rows)
    rows_of = table_shard[jnp.clip(where, 0, rows - 1)]
    return jax.lax.psum(jnp.where(mine[..., None], rows_of, 0).astype(table_shard.dtype), AXIS)

  return _sharded(local, (ROWS, ALL), ALL)(table, ids)


# ---- the block loop ----------------------------------------------------------------------

def _block_scores(x, table, start, visited_to, offset, spec: Spec, include_padding: bool):
  """(scores [..., B, block] float32 with invalid rows at -inf, ids [block], valid [block])."""
  block, _ = blocking(table.shape[0], spec.block)
  rows = jax.lax.dynamic_slice_in_dim(table, start, block, axis=0)
  local_ids = start + jnp.arange(block)
  ids = offset + local_ids
  valid = (local_ids >= visited_to) & (ids <= spec.num_items)
  if not include_padding:
    valid &= ids >= 1
  scores = jnp.einsum("...h,nh->...n", x, rows.astype(x.dtype)).astype(jnp.float32)
  if spec.scale != 1.0:
    scores = scores * spec.scale
  return jnp.where(valid, scores, -jnp.inf), ids, valid


def blocking(rows: int, block: int) -> tuple[int, int]:
  """(rows per block, number of blocks) for `rows` table rows in blocks of at most `block`:
  the fewest blocks, of equal size, so the last one re-reads fewer than `count` rows (10,001
  rows in blocks of at most 8,192: 2 x 5,001, not 8,192 + a clamped 8,192)."""
  count = -(-rows // max(1, min(block, rows)))
  return -(-rows // count), count


def _scan_blocks(table, spec: Spec, body, init):
  """carry = body(carry, block_start, visited_to) over the row blocks of `table`."""
  rows = table.shape[0]
  block, count = blocking(rows, spec.block)

  def step(carry, index):
    start = jnp.minimum(index * block, rows - block)  # The last block is clamped to the end.
    return body(carry, start, index * block), None

  carry, _ = jax.lax.scan(jax.checkpoint(step), init, jnp.arange(count))
  return carry


def _combine_logsumexp(maximum, total, sharded: bool):
  """Partial (max, sum of exp(score - max)) -> log-sum-exp, across 'items' when sharded."""
  if sharded:
    shift = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(maximum), AXIS))
    total = jax.lax.psum(total * jnp.exp(maximum - shift), AXIS)
    maximum = shift
  return maximum + jnp.log(total)


def _local_logsumexp(x, table, targets, offset, spec: Spec, include_padding: bool):
  """(max, sum exp, target score) over this device's rows; x [..., B, H], targets [B]."""
  lead = x.shape[:-1]

  def body(carry, start, visited_to):
    maximum, total, target = carry
    scores, ids, _ = _block_scores(x, table, start, visited_to, offset, spec, include_padding)
    maximum, total = _accumulate(maximum, total, scores)
    hit = (ids == targets[:, None]) & jnp.isfinite(scores)
    target = target + jnp.sum(jnp.where(hit, scores, 0.0), axis=-1)
    return maximum, total, target

  init = (jnp.full(lead, -jnp.inf), jnp.zeros(lead), jnp.zeros(lead))
  maximum, total, target = _scan_blocks(table, spec, body, init)
  return (*_finish(maximum, total), target)


def _accumulate(maximum, total, scores):
  """Online log-sum-exp: (running max, sum of exp(score - max)) after one block [..., n]."""
  block_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
  new_max = jnp.maximum(maximum, block_max)
  safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
  total = total * jnp.exp(maximum - safe) + jnp.sum(jnp.exp(scores - safe[..., None]), axis=-1)
  return new_max, total


def _finish(maximum, total):
  """(finite max, total rescaled to it): rows with no finite score keep max 0."""
  safe = jnp.where(jnp.isfinite(maximum), maximum, 0.0)
  return safe, total * jnp.exp(maximum - safe)


def logsumexp_and_target(x, table, targets, spec: Spec, include_padding: bool = False):
  """(log-sum-exp over items [..., B], target logit [..., B]) of scale * x . E^T, blockwise.

  x [..., B, H]; targets [B]. Items 1..N (0..N with include_padding, the DiffuRec code's loss).
  """
  if item_shards() <= 1:
    maximum, total, target = _local_logsumexp(x, table, targets, 0, spec, include_padding)
    return _combine_logsumexp(maximum, total, False), target

  def local(x, table_shard, targets):
    offset = _offset(table_shard.shape[0], True)
    maximum, total, target = _local_logsumexp(x, table_shard, targets, offset, spec,
                                              include_padding)
    return _combine_logsumexp(maximum, total, True), jax.lax.psum(target, AXIS)

  return _sharded(local, (ALL, ROWS, ALL), (ALL, ALL))(x, table, targets)


def cross_entropy(x, table, targets, spec: Spec, include_padding: bool = False) -> jax.Array:
  """Per-row softmax cross-entropy [B] of scale * x [B, H] . E^T against targets [B] (1..N)."""
  lse, target = logsumexp_and_target(x, table, targets, spec, include_padding)
  return lse - target


# ---- ranks and top-K over log probabilities ----------------------------------------------

def _log_probs(scores, lse):
  """Block scores [S, B, n] and log-sum-exps [S, B] -> log of the mean distribution [B, n]."""
  log_probs = scores - lse[..., None]
  if scores.shape[0] == 1:
    return log_probs[0]
  return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(scores.shape[0])


def _hidden_in_block(history, targets, ids):
  """[B, block] bool: history items of the block (not the target), to be excluded."""
  rows = jnp.arange(history.shape[0])[:, None]
  where = history - ids[0]
  hide = (history != 0) & (history != targets[:, None])
  where = jnp.where(hide & (where >= 0) & (where < ids.shape[0]), where, ids.shape[0])
  return jnp.zeros((history.shape[0], ids.shape[0]), bool).at[rows, where].max(
      hide, mode="drop")


def _local_rank_topk(x, table, targets, lse, target_log_prob, history, offset, spec: Spec,
                     k: int):
  """(#competitors that beat the target [B], top-k (log probs [B, k], ids [B, k])), local."""
  batch = targets.shape[0]

  def body(carry, start, visited_to):
    beaten, top_values, top_ids = carry
    scores, ids, valid = _block_scores(x, table, start, visited_to, offset, spec, False)
    log_probs = _log_probs(scores, lse)
    if history is not None:
      log_probs = jnp.where(_hidden_in_block(history, targets, ids), -jnp.inf, log_probs)
    competitor = valid[None, :] & (ids[None, :] != targets[:, None])
    beats = (log_probs >= target_log_prob[:, None]) | jnp.isnan(log_probs)
    beaten = beaten + jnp.sum(competitor & beats, axis=1, dtype=jnp.int32)
    if k:
      top_values, top_ids = _keep_top_k(top_values, top_ids, log_probs, ids, k)
    return beaten, top_values, top_ids

  init = (jnp.zeros((batch,), jnp.int32), jnp.full((batch, k), -jnp.inf),
          jnp.zeros((batch, k), jnp.int32))
  return _scan_blocks(table, spec, body, init)


def _merge_top_k(values_a, ids_a, values_b, ids_b, k: int):
  """The k best of two candidate lists [B, *]; on equal values the earlier list wins."""
  values = jnp.concatenate([values_a, values_b], axis=1)
  ids = jnp.concatenate([ids_a, ids_b], axis=1)
  best, where = jax.lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, where, axis=1)


def _keep_top_k(top_values, top_ids, values, ids, k: int):
  """The running top-k [B, k] merged with one block's values [B, block] (ids [block])."""
  best, where = jax.lax.top_k(values, min(k, ids.shape[0]))
  return _merge_top_k(top_values, top_ids, best, ids[where], k)


def _gather_top_k(values, ids, k: int):
  """The k best over every shard's top-k [B, k]: shards are in id order, so on equal values
  the lower id wins, as in the dense top_k."""
  values, ids = (jax.lax.all_gather(a, AXIS, axis=1, tiled=True) for a in (values, ids))
  values, where = jax.lax.top_k(values, k)
  return values, jnp.take_along_axis(ids, where, axis=1)


def ranks_and_top_k(x, table, targets, spec: Spec, history=None, k: int = 0):
  """Pessimistic 1-based ranks [B] of the targets and the top-k items, blockwise.

  x [S, B, H]: S chains' x0 (S = 1: one chain; SASRec: its last hidden state); items are
  ranked by the log of the mean of the S softmax distributions, as samplers.ensemble_log_probs.
  history [B, L] or None: the user's history items (except the target) are excluded, as
  metrics.mask_items. Returns (ranks [B] int32 in 1..N, top log probs [B, k], top ids [B, k]);
  the top-K lists are empty when k = 0. As metrics.pessimistic_rank: a competitor scored NaN
  beats the target, a NaN target gets rank N.
  """
  lse, target_scores = logsumexp_and_target(x, table, targets, spec)
  target_log_prob = _log_probs(target_scores[..., None], lse)[:, 0]

  if item_shards() <= 1:
    beaten, values, ids = _local_rank_topk(x, table, targets, lse, target_log_prob, history, 0,
                                           spec, k)
  else:
    def local(x, table_shard, targets, lse, target_log_prob, *history):
      offset = _offset(table_shard.shape[0], True)
      beaten, values, ids = _local_rank_topk(x, table_shard, targets, lse, target_log_prob,
                                             history[0] if history else None, offset, spec, k)
      beaten = jax.lax.psum(beaten, AXIS)
      if k:
        values, ids = _gather_top_k(values, ids, k)
      return beaten, values, ids

    extra = () if history is None else (history,)
    beaten, values, ids = _sharded(local, (ALL, ROWS) + (ALL,) * (3 + len(extra)),
                                   (ALL, ALL, ALL))(x, table, targets, lse, target_log_prob,
                                                    *extra)
  ranks = 1 + beaten
  ranks = jnp.where(jnp.isnan(target_log_prob), spec.num_items, ranks).astype(jnp.int32)
  return ranks, values, ids


def top_k(x, table, spec: Spec, k: int, history=None):
  """The k items of highest mean log probability [B, k] and their ids [B, k] (history items
  excluded when given); x [S, B, H].

  One chain (S = 1) takes one pass over the table: a softmax shifts every score of a row by
  the same log-sum-exp, so the top-k raw scores are the top-k log probabilities, and the
  log-sum-exp accumulates beside them. Ensembles take two (the mean of S softmaxes needs each
  chain's log-sum-exp first). Rows with a NaN score get NaN values.
  """
  if x.shape[0] > 1:
    no_target = jnp.zeros(x.shape[1], jnp.int32)  # The padding id: no item is kept unmasked.
    _, values, ids = ranks_and_top_k(x, table, no_target, spec, history, k)
    return values, ids
  if item_shards() <= 1:
    maximum, total, values, ids = _local_top_k_one_chain(x[0], table, history, 0, spec, k)
    return values - _combine_logsumexp(maximum, total, False)[:, None], ids

  def local(x, table_shard, *history):
    offset = _offset(table_shard.shape[0], True)
    maximum, total, values, ids = _local_top_k_one_chain(
        x, table_shard, history[0] if history else None, offset, spec, k)
    values, ids = _gather_top_k(values, ids, k)
    return values - _combine_logsumexp(maximum, total, True)[:, None], ids

  extra = () if history is None else (history,)
  return _sharded(local, (ALL, ROWS) + (ALL,) * len(extra), (ALL, ALL))(x[0], table, *extra)


def _local_top_k_one_chain(x, table, history, offset, spec: Spec, k: int):
  """One pass of one chain x [B, H] over this device's rows: (max [B], sum exp [B]) of every
  item's score and the k best raw scores [B, k] with their ids [B, k], history hidden."""
  batch = x.shape[0]
  no_target = jnp.zeros((batch,), jnp.int32)

  def body(carry, start, visited_to):
    maximum, total, top_values, top_ids = carry
    scores, ids, _ = _block_scores(x, table, start, visited_to, offset, spec, False)
    maximum, total = _accumulate(maximum, total, scores)
    if history is not None:
      scores = jnp.where(_hidden_in_block(history, no_target, ids), -jnp.inf, scores)
    top_values, top_ids = _keep_top_k(top_values, top_ids, scores, ids, k)
    return maximum, total, top_values, top_ids

  init = (jnp.full((batch,), -jnp.inf), jnp.zeros((batch,)), jnp.full((batch, k), -jnp.inf),
          jnp.zeros((batch, k), jnp.int32))
  maximum, total, values, ids = _scan_blocks(table, spec, body, init)
  return (*_finish(maximum, total), values, ids)
