"""Shared machinery of the attention kernels: softmax parts, masks, padding.

Every kernel in this package writes its attention as a set of *parts*: groups
of keys (a sliding window, the global tokens, block summaries, one level of a
hierarchy) that are normalised together in one softmax. Each part returns the
unnormalised statistics of flash attention for every query,

    max  m = max_k s_k,   sum  l = sum_k w_k exp(s_k - m),
    out  o = sum_k w_k exp(s_k - m) v_k,

and `merge` combines any number of parts exactly (the log-sum-exp merge of
Rabe & Staats 2021 / FlashAttention). `w_k` is an optional multiplicative
weight (the soft span mask of adaptive span); additive terms (position bias,
the log-count of a pooled key) go into the score. A part over blocked keys is
computed by `_blocks.attend_blocks`, whose backward recomputes the score tiles
instead of saving them (FlashAttention's backward).

Layout conventions (internal):
  * heads-major: queries [batch, kv_heads, group, length, dim] (query head
    h = kv_head * group + g shares key/value head kv_head), keys and values
    [batch, kv_heads, length, dim];
  * blocked: a block axis after the heads, queries [batch, kv_heads, blocks,
    group, block_len, dim], keys [batch, kv_heads, blocks, block_len, dim].

Numerics: scores, softmax and accumulation are float32 whatever the input
dtype; the two matmuls take the input dtype (bf16 inputs -> bf16 MXU/tensor-core
matmuls with fp32 accumulation). Rows that see no key produce zeros, never NaN.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longjax import sharding

# Scores of masked keys. Finite, so that max/exp of an all-masked row stay
# finite (the row is zeroed by the mask, not by inf arithmetic).
MASK_VALUE = -1e30

# bias_fn(relative_position) -> bias: maps integer query_position - key_position
# (any shape S) to an additive float bias of shape S + (num_heads,).
BiasFn = Callable[[jax.Array], jax.Array]


class Part(NamedTuple):
  """Unnormalised softmax statistics of one group of keys, per query.

  max, sum: [batch, kv_heads, group, q_len] float32; out: [..., head_dim] float32.
  """
  max: jax.Array
  sum: jax.Array
  out: jax.Array


def check_qkv(q, k, v, name: str):
  """Validates shapes; returns (batch, q_len, kv_len, heads, kv_heads, dim)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f'{name}: q, k, v must be [batch, length, heads, head_dim]; got shapes '
        f'{q.shape}, {k.shape}, {v.shape}.')
  batch, q_len, heads, dim = q.shape
  if k.shape != v.shape:
    raise ValueError(f'{name}: k and v shapes differ: {k.shape} vs {v.shape}.')
  if k.shape[0] != batch or k.shape[3] != dim:
    raise ValueError(
        f'{name}: k/v batch and head_dim must match q: q {q.shape}, k {k.shape}.')
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(
        f'{name}: query heads ({heads}) must be a multiple of key/value heads '
        f'({kv_heads}) for grouped-query attention.')
  return batch, q_len, k.shape[1], heads, kv_heads, dim


def check_segment_ids(segment_ids, batch, length, name, field='segment_ids'):
  if segment_ids is None:
    return None
  if segment_ids.shape != (batch, length):
    raise ValueError(
        f'{name}: {field} must be [batch, length] = {(batch, length)}; got '
        f'{segment_ids.shape}.')
  return segment_ids.astype(jnp.int32)


def check_positive_int(value, name, field, minimum=1):
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name}: {field} must be an int >= {minimum}; got {value!r}.')
  return int(value)


class Dims(NamedTuple):
  batch: int
  length: int
  heads: int
  kv_heads: int
  head_dim: int


def self_attention_inputs(q, k, v, segment_ids, scale: Optional[float], name: str):
  """The prologue every self-attention kernel shares.

  Checks the shapes (q [b, l, heads, d], k and v [b, l, kv_heads, d], the same
  length) and the segment ids, and returns (qh, kh, vh, segment_ids, dims):
  queries times the softmax scale and keys/values, heads-major (see
  heads_major_queries), segment ids as int32 or None.
  """
  batch, length, kv_len, heads, kv_heads, dim = check_qkv(q, k, v, name)
  if kv_len != length:
    raise ValueError(f'{name}: is self-attention; q and k lengths differ ({length} vs {kv_len}).')
  segment_ids = check_segment_ids(segment_ids, batch, length, name)
  return (scaled_queries(q, kv_heads, dim, scale), heads_major(k), heads_major(v), segment_ids,
          Dims(batch, length, heads, kv_heads, dim))


def default_scale(dim: int, scale: Optional[float]) -> float:
  return 1.0 / math.sqrt(dim) if scale is None else float(scale)


def heads_major_queries(q, kv_heads):
  """[b, l, heads, d] -> [b, kv_heads, group, l, d].

  Kernels work heads-major so that every matmul has its batch dimensions
  (batch, head, block) leading and contiguous: XLA then runs plain batched
  GEMMs instead of transposing inside each dot (2x faster on CPU).
  """
  b, l, h, d = q.shape
  return jnp.transpose(q.reshape(b, l, kv_heads, h // kv_heads, d), (0, 2, 3, 1, 4))


def heads_major(x):
  """[b, l, kv_heads, d] -> [b, kv_heads, l, d]."""
  return jnp.transpose(x, (0, 2, 1, 3))


def scaled_queries(q, kv_heads, dim, scale):
  """Queries times the softmax scale, heads-major (see heads_major_queries)."""
  return heads_major_queries(q * jnp.asarray(default_scale(dim, scale), q.dtype), kv_heads)


def pad_axis(x, axis: int, new_size: int, value=0):
  """Pads axis `axis` of x at the end to `new_size`."""
  extra = new_size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def bias_heads(bias_fn: BiasFn, rel, kv_heads: int):
  """Evaluates bias_fn on relative positions of shape S; returns S + (kv_heads, group) f32."""
  bias = bias_fn(jnp.asarray(rel, jnp.int32)).astype(jnp.float32)
  heads = bias.shape[-1]
  return bias.reshape(bias.shape[:-1] + (kv_heads, heads // kv_heads))


def bias_tile(bias_fn: BiasFn, rel, kv_heads: int):
  """Bias of a [tq, tk] relative-position tile as [kv_heads, group, tq, tk]."""
  return jnp.moveaxis(bias_heads(bias_fn, rel, kv_heads), (-2, -1), (0, 1))


def softmax_stats(scores, mask, weight=None):
  """Masked, shifted exponentials: (row max, probabilities, row sums).

  Masked scores are set to MASK_VALUE. A row with no visible key is shifted
  by 0 instead, so that its exponentials underflow to 0, but reports its max
  as MASK_VALUE: `merge` must not let an empty part's placeholder outrank the
  real maxima of the others. (A placeholder of 0 above real scores of, say,
  -60 made every correction exp(-60) and the merged row sum ~1e-26, whose
  square underflows in the backward pass: NaN gradients.)
  """
  scores = jnp.where(mask, scores, MASK_VALUE)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  shift = jnp.where(row_max > MASK_VALUE / 2, row_max, 0.0)
  probs = jnp.exp(scores - shift)
  if weight is not None:
    probs = probs * weight
  return row_max[..., 0], probs, jnp.sum(probs, axis=-1)


def attend_per_query(q, k, v, *, mask, bias=None, log_weight=None) -> Part:
  """One part where every query has its own private key(s).

  Args:
    q: [b, kv_heads, group, l, d] (scaled); k, v: [b, kv_heads, l, m, d] — m
      keys private to each query; mask: bool broadcastable to
      [b, kv_heads, group, l, m]; bias, log_weight: f32 broadcastable likewise.
  """
  scores = jnp.einsum('bhgld,bhlmd->bhglm', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    scores = scores + bias
  if log_weight is not None:
    scores = scores + log_weight
  row_max, probs, row_sum = softmax_stats(scores, mask)
  out = jnp.einsum('bhglm,bhlmd->bhgld', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return Part(row_max, row_sum, out)


def slice_part(part: Part, length: int) -> Part:
  return Part(part.max[..., :length], part.sum[..., :length], part.out[..., :length, :])


def combine(a: Part, b: Part) -> Part:
  """The unnormalised statistics of the union of two parts' keys (same queries)."""
  m = jnp.maximum(a.max, b.max)
  ca, cb = jnp.exp(a.max - m), jnp.exp(b.max - m)
  return Part(m, a.sum * ca + b.sum * cb, a.out * ca[..., None] + b.out * cb[..., None])


def merge(parts: Sequence[Part], dtype) -> jax.Array:
  """Normalises the union of all parts' keys in one softmax.

  Returns [batch, q_len, heads, head_dim] in `dtype`; rows with no visible key
  (sum 0 in every part) are 0.
  """
  total_max = parts[0].max
  for p in parts[1:]:
    total_max = jnp.maximum(total_max, p.max)
  total_sum = 0.0
  total_out = 0.0
  for p in parts:
    correction = jnp.exp(p.max - total_max) if len(parts) > 1 else 1.0
    total_sum = total_sum + p.sum * correction
    total_out = total_out + p.out * (correction[..., None] if len(parts) > 1 else 1.0)
  safe_sum = jnp.where(total_sum > 0, total_sum, 1.0)
  out = (total_out / safe_sum[..., None]).astype(dtype)
  b, hk, g, l, d = out.shape
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, l, hk * g, d)


def shift(x, axis: int, by: int):
  """x shifted along `axis` so that out[C] = x[C - by] (zeros where missing).

  One lax.pad with low = by, high = -by: the axis keeps its length, so under
  sequence sharding GSPMD moves |by| entries between neighbouring shards (a
  halo), where padding then slicing changes the length and re-shards.
  """
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (by, -by, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def neighbor_blocks(x, *, before: int, after: int, axis: int = 1):
  """Concatenates each block with its neighbours along the following axis.

  x: [..., n (at `axis`), t, ...] -> [..., n, (before + 1 + after) * t, ...];
  missing neighbours at the ends are zeros (and must be masked by the caller).

  Built from shifts that keep the block axis n long (lax.pad with low = -j,
  high = j), never from a padded n + before + after axis: under sequence
  sharding GSPMD then moves exactly one block per neighbour (the halo), where
  a padded axis no longer divides the mesh and forced a re-shard of the whole
  array (6.25 MiB per layer at 64k on 8 shards instead of 0.5; kernels study).
  """
  # Block m of each piece is block m + j of x.
  return jnp.concatenate([shift(x, axis, -j) for j in range(-before, after + 1)],
                         axis=axis + 1)


def segment_bounds(segment_ids):
  """Start and end (exclusive) of each token's segment, [b, l] int32 each.

  Segments are contiguous runs of equal ids (as packing produces them). On a
  sequence-sharded input each shard scans its own positions and takes the
  carries from the other shards' totals (n numbers per row), where GSPMD
  would gather the whole [b, l] array to scan it.
  """
  b, l = segment_ids.shape
  shards = sharding.mesh_axis_size('sequence')
  if shards > 1 and l % shards == 0:
    names = ('batch', 'length')
    return sharding.per_shard(functools.partial(_sharded_segment_bounds, shards=shards, length=l),
                              (segment_ids,), (names,), [(names, (b, l)), (names, (b, l))])
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  change = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(change, pos, 0), axis=1)
  ends_here = jnp.concatenate(
      [segment_ids[:, 1:] != segment_ids[:, :-1], jnp.ones((b, 1), bool)], axis=1)
  end = jax.lax.cummin(jnp.where(ends_here, pos + 1, l), axis=1, reverse=True)
  return start, end


def _sharded_segment_bounds(ids, *, shards: int, length: int):
  """segment_bounds of one sequence shard (inside shard_map over 'sequence')."""
  shard = ids.shape[1]
  index = jax.lax.axis_index('sequence')
  pos = index * shard + jnp.arange(shard, dtype=jnp.int32)[None, :]
  send = lambda x, step: jax.lax.ppermute(
      x, 'sequence', [(i, i + step) for i in range(shards) if 0 <= i + step < shards])
  before = jnp.concatenate([send(ids[:, -1:], 1), ids[:, :-1]], axis=1)  # left neighbours
  after = jnp.concatenate([ids[:, 1:], send(ids[:, :1], -1)], axis=1)    # right neighbours
  change = (ids != before) | (pos == 0)
  ends_here = (ids != after) | (pos == length - 1)
  starts = jnp.where(change, pos, 0)
  ends = jnp.where(ends_here, pos + 1, length)
  # Carries: the latest start on earlier shards, the earliest end on later ones.
  shard_ids = jnp.arange(shards)[:, None]
  latest = jax.lax.all_gather(jnp.max(starts, axis=1), 'sequence')    # [shards, b]
  earliest = jax.lax.all_gather(jnp.min(ends, axis=1), 'sequence')
  carry_start = jnp.max(jnp.where(shard_ids < index, latest, 0), axis=0)[:, None]
  carry_end = jnp.min(jnp.where(shard_ids > index, earliest, length), axis=0)[:, None]
  start = jnp.maximum(jax.lax.cummax(starts, axis=1), carry_start)
  end = jnp.minimum(jax.lax.cummin(ends, axis=1, reverse=True), carry_end)
  return start.astype(jnp.int32), end.astype(jnp.int32)


_SCANS = {'add': (jax.lax.cumsum, jnp.sum, jnp.add, 0),
          'max': (jax.lax.cummax, jnp.max, jnp.maximum, np.iinfo(np.int32).min),
          'min': (jax.lax.cummin, jnp.min, jnp.minimum, np.iinfo(np.int32).max)}


def cumulative(x, op: str, *, reverse: bool = False):
  """Inclusive scan ('add', 'max' or 'min') of int32 x [b, l] along the length.

  On a sequence-sharded input each shard scans its own positions and combines
  the totals of the shards before it (after it, reverse) — n numbers per row —
  where GSPMD would gather the whole row to scan it.
  """
  scan, reduce, combine, identity = _SCANS[op]
  x = x.astype(jnp.int32)
  b, l = x.shape
  shards = sharding.mesh_axis_size('sequence')
  if shards == 1 or l % shards:
    return scan(x, axis=1, reverse=reverse)

  def run(x):
    index = jax.lax.axis_index('sequence')
    totals = jax.lax.all_gather(reduce(x, axis=1), 'sequence')  # [shards, b]
    shard = jnp.arange(shards)[:, None]
    earlier = shard > index if reverse else shard < index
    carry = reduce(jnp.where(earlier, totals, identity), axis=0)[:, None]
    return combine(scan(x, axis=1, reverse=reverse), carry).astype(jnp.int32)

  names = ('batch', 'length')
  return sharding.per_shard(run, (x,), (names,), [(names, (b, l))])


def scatter_rows(target, values, size: int, fill=0, *, add: bool = False):
  """rows [b, size, ...]: values [b, l, ...] scattered to slots target [b, l]
  (out of range: dropped). Without `add`, every token sent to one slot sends
  the same value and untouched slots hold `fill`; with it, slots sum.

  On a sequence-sharded input each shard scatters its own tokens and the
  shards' [b, size] rows meet in one all-reduce (a max, or a sum), where
  GSPMD would gather the tokens' targets and values.
  """
  b, l = target.shape
  shards = sharding.mesh_axis_size('sequence')

  def scatter(target, values, fill):  # (per shard: its own batch rows)
    rows = jnp.arange(target.shape[0])[:, None]
    base = jnp.full((target.shape[0], size) + values.shape[2:], fill, values.dtype)
    at = base.at[rows, target]
    return at.add(values, mode='drop') if add else at.set(values, mode='drop')

  if shards == 1 or l % shards:
    return scatter(target, values, fill)
  dtype = values.dtype
  if dtype == bool:  # (pmax takes numbers)
    values = values.astype(jnp.int32)
  low = jnp.array(jnp.iinfo(values.dtype).min if jnp.issubdtype(values.dtype, jnp.integer)
                  else -jnp.inf, values.dtype)

  def run(target, values):
    if add:
      return jax.lax.psum(scatter(target, values, 0), 'sequence')
    sent = jax.lax.pmax(scatter(target, jnp.ones(target.shape, jnp.int32), 0), 'sequence')
    best = jax.lax.pmax(scatter(target, values, low), 'sequence')
    return jnp.where(sent.reshape(sent.shape + (1,) * (values.ndim - 2)) > 0, best, fill)

  value_names = ('batch', 'length') + (None,) * (values.ndim - 2)
  out_names = ('batch', None) + (None,) * (values.ndim - 2)
  result = sharding.per_shard(run, (target, values), (('batch', 'length'), value_names),
                              [(out_names, (b, size) + values.shape[2:])])
  return result.astype(dtype)
