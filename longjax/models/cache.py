"""Key/value caches for decoding token by token, one per self-attention layer.

A cache is a position-tagged buffer: keys and values [batch * kv_heads, slots,
head_dim] (keys after RoPE at their absolute position; rows and heads merged,
so that a query's scores are one batched matrix-vector product over contiguous
keys, read in place: see KVBuffer)
and the absolute position held by each slot (-1 = empty). A position p goes to slot

    p                                   if p < pinned
    pinned + (p - pinned) % ring        otherwise (a ring buffer),

so a cache of `pinned + ring` slots holds the pinned positions and the last
`ring` others. Pooled buffers hold the means of groups of consecutive tokens
(transient-global summaries, hierarchical coarse keys) in rings of their own:
exact, since a running float32 sum of the open group's keys and values
becomes the group's mean when its last token arrives, as the kernels pool.
A buffer of summaries formed from inputs (`CacheLayout.pool_from_inputs`,
LongT5's TGlobal) sums the open block's layer inputs instead, and the layer's
`summarize` turns the sum into the summary's key and value when it closes.

This module knows no attention kind. How many slots of each sort a layer
keeps (`CacheLayout`) and which of them a query at t sees (`decode_keys`)
are the kind's decoding rule, in its registry entry (`longjax.attention`),
written beside its kernel; `attend` hands the buffers to that rule. Memory is
O(window) for the windowed kinds however long the generation (see each
kind's `cache_layout`). Decoding assumes one document per row (no packing):
prompts are right-padded and `lengths` says where each ends.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from longjax import sharding
from longjax.attention import cached
from longjax.attention.spec import CacheLayout, KindSpec, Slots


class KVBuffer(NamedTuple):
  """k, v: [batch * kv_heads, slots, head_dim], the rows and heads merged
  (row-major); pos: [batch, slots] int32 (-1 empty).

  Why merged: every decoding step writes one slot of these buffers in place
  and reads all of them in a matrix-vector product. With a size-1 axis
  (batch 1), XLA's CPU compiler drops it from the product's operand, a reshape
  it fuses with the step's write, which then writes a fresh copy of the whole
  buffer every step (5x slower at 16k with batch 1, benchmarks/decode.py).
  Merged, the product reads the written buffer itself; `heads()` gives the
  [batch, kv_heads, slots, head_dim] view the decode rules take, and
  `cached.attend` merges it back (reshapes that cancel).

  Quantized (decode.kv_cache_dtype = 'int8'; the window buffer only): k and v
  are int8 and k_scale, v_scale [batch * kv_heads, slots] float32 hold each
  token's and head's scale, key = k * k_scale (symmetric, max |x| / 127).
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  k_scale: Optional[jax.Array] = None
  v_scale: Optional[jax.Array] = None

  def heads(self, dtype=None) -> Slots:
    """The buffer as Slots, k and v [batch, kv_heads, slots, head_dim] (int8
    dequantized to `dtype`)."""
    k, v = self.k, self.v
    if self.k_scale is not None:  # dequantized as it is read (fused into the products)
      k, v = dequantize(k, self.k_scale, dtype), dequantize(v, self.v_scale, dtype)
    batch = self.pos.shape[0]
    return Slots(_split_rows(k, batch), _split_rows(v, batch), self.pos)


CACHE_DTYPES = ('auto', 'int8')  # 'auto': the model's compute dtype


def quantize(x):
  """x [..., d] -> (int8 [..., d], float32 scale [...]): per-vector symmetric int8."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


def dequantize(values, scale, dtype):
  return (values.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _quantized_window(window: KVBuffer) -> KVBuffer:
  (k, k_scale), (v, v_scale) = quantize(window.k), quantize(window.v)
  return KVBuffer(k, v, window.pos, k_scale, v_scale)


class PooledBuffer(NamedTuple):
  """Means of groups of `size` tokens in a ring of slots, and the open group's sums.

  k, v: [batch, kv_heads, slots, head_dim] group means; group: [batch, slots]
  int32 index c of the group held (tokens [c * size, (c + 1) * size)), -1 empty;
  sum_k, sum_v: [batch, kv_heads, head_dim] float32 sums of the open group so far;
  sum_x: [batch, emb] float32 sum of the open group's inputs instead, for
  summaries formed from inputs (then sum_k and sum_v are None);
  query: [batch, heads, head_dim] the query of the open group's first
  position, for layouts with pool_queries (H-Transformer-1D's coarse query).
  """
  k: jax.Array
  v: jax.Array
  group: jax.Array
  sum_k: Optional[jax.Array]
  sum_v: Optional[jax.Array]
  sum_x: Optional[jax.Array] = None
  query: Optional[jax.Array] = None


@struct.dataclass
class LayerCache:
  """The cache of one self-attention layer: a window buffer and pooled buffers
  (and, for separate global projections, their keys/values of the pinned
  positions). length: the positions it is made for, 0..length-1 (the model
  sets it; a length-dependent RoPE, dynamic NTK, rotates by it)."""
  window: KVBuffer
  pooled: tuple[PooledBuffer, ...]
  layout: CacheLayout = struct.field(pytree_node=False)
  global_kv: Optional[KVBuffer] = None
  length: int = struct.field(pytree_node=False, default=0)


def _constrain(buffer):
  return sharding.constrain(buffer, ('batch', 'kv_heads', 'kv_length', 'kv'))


def _merge_rows(x):
  """[batch, kv_heads, slots, ...] -> [batch * kv_heads, slots, ...] (KVBuffer's layout)."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _split_rows(x, batch: int):
  """[batch * kv_heads, slots, ...] -> [batch, kv_heads, slots, ...], laid out as training's."""
  x = x.reshape((batch, x.shape[0] // batch) + x.shape[1:])
  return _constrain(x) if x.ndim == 4 else x


def _write_slot(buffer, slot, value):
  """buffer[r * kv_heads + h, slot[r]] = value[r, h] for a merged buffer
  [batch * kv_heads, slots, ...] and value [batch, kv_heads, ...]: one scatter,
  in place in the decoding loop (the slots are in range by construction)."""
  batch, kv_heads = value.shape[:2]
  merged = jnp.arange(batch * kv_heads)
  return buffer.at[merged, jnp.repeat(slot, kv_heads)].set(
      _merge_rows(value[:, :, None])[:, 0].astype(buffer.dtype), mode='promise_in_bounds')


def init(layout: CacheLayout, batch: int, kv_heads: int, head_dim: int, dtype, *,
         emb_dim: Optional[int] = None, heads: Optional[int] = None,
         cache_dtype: str = 'auto') -> LayerCache:
  """An empty cache (emb_dim: the layer's input width, for summaries from inputs;
  heads: the query heads, for layouts with pool_queries; cache_dtype 'int8': the
  window buffer quantized)."""
  zeros = lambda slots: jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
  merged = lambda slots: jnp.zeros((batch * kv_heads, slots, head_dim), dtype)
  window = KVBuffer(merged(layout.slots), merged(layout.slots),
                    jnp.full((batch, layout.slots), -1, jnp.int32))
  if _check_dtype(cache_dtype) == 'int8':
    window = _quantized_window(window)

  def empty(n):
    group = jnp.full((batch, n), -1, jnp.int32)
    if layout.pool_from_inputs:
      if emb_dim is None:
        raise ValueError('A cache of summaries formed from inputs needs emb_dim.')
      return PooledBuffer(zeros(n), zeros(n), group, None, None,
                          jnp.zeros((batch, emb_dim), jnp.float32))
    sums = lambda: jnp.zeros((batch, kv_heads, head_dim), jnp.float32)
    return PooledBuffer(zeros(n), zeros(n), group, sums(), sums())

  global_kv = None
  if layout.global_slots:
    n = layout.global_slots
    global_kv = KVBuffer(merged(n), merged(n), jnp.full((batch, n), -1, jnp.int32))
  pooled = tuple(empty(n) for n in layout.pool_slots)
  if layout.pool_queries:
    if heads is None:
      raise ValueError('A cache that keeps queries of group starts needs heads.')
    pooled = tuple(p._replace(query=jnp.zeros((batch, heads, head_dim), dtype)) for p in pooled)
  return LayerCache(window, pooled, layout, global_kv)


def _ring_fill(count, pinned: int, ring: int, slots: int):
  """Which item (position or group index) each slot holds after items 0..count-1.

  count: [batch] int32. Returns [batch, slots] int32, -1 for empty slots.
  """
  s = jnp.arange(slots, dtype=jnp.int32)[None, :]
  count = count[:, None]
  pinned_item = jnp.where(s < count, s, -1)
  if ring == 0:
    return jnp.where(s < pinned, pinned_item, -1)
  u = s - pinned
  rest = count - pinned  # items that went to the ring
  back = rest - 1 - u
  ring_item = jnp.where(back >= 0, pinned + u + ring * (back // ring), -1)
  return jnp.where(s < pinned, pinned_item, ring_item)


def _gather_slots(x, index, held):
  """x [b, n, kv_heads, d] at index [b, slots] -> [b, kv_heads, slots, d], 0 where not held."""
  index = jnp.clip(index, 0, x.shape[1] - 1)
  taken = jnp.take_along_axis(x, index[:, :, None, None], axis=1)
  taken = jnp.where(held[:, :, None, None], taken, jnp.zeros((), x.dtype))
  return _constrain(jnp.swapaxes(taken, 1, 2))


def _check_dtype(cache_dtype: str) -> str:
  if cache_dtype not in CACHE_DTYPES:
    raise ValueError(f'config.decode.kv_cache_dtype={cache_dtype!r} is not one of {CACHE_DTYPES}.')
  return cache_dtype


def from_prompt(layout: CacheLayout, k, v, lengths, *, summaries=None,
                global_kv=None, queries=None, cache_dtype: str = 'auto') -> LayerCache:
  """The cache after a prompt, from the keys and values the prefill computed.

  k, v: [batch, prompt_len, kv_heads, head_dim] (keys after RoPE); lengths:
  [batch] int, the real prompt length of each row (>= 1; later positions are
  padding and are not cached). summaries (layouts with pool_from_inputs):
  (summary_k, summary_v [batch, prompt_len // size, kv_heads, head_dim] of
  blocks 0, 1, ..., x [batch, prompt_len, emb] the layer's inputs).
  global_kv (layouts with global_slots): (k, v) of the global projections.
  queries (layouts with pool_queries): [batch, prompt_len, heads, head_dim].
  cache_dtype: 'int8' stores the window buffer quantized (KVBuffer).
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  pos = _ring_fill(lengths, layout.pinned, layout.ring, layout.slots)
  held = pos >= 0
  window = KVBuffer(_merge_rows(_gather_slots(k, pos, held)),
                    _merge_rows(_gather_slots(v, pos, held)), pos)
  if _check_dtype(cache_dtype) == 'int8':
    window = _quantized_window(window)
  if layout.pool_from_inputs:
    if summaries is None:
      raise ValueError('This layout forms its summaries from inputs: pass summaries=.')
    pooled = tuple(_summaries_from_prompt(size, slots, *summaries, lengths)
                   for size, slots in zip(layout.pool_sizes, layout.pool_slots))
  else:
    pooled = tuple(_pooled_from_prompt(size, slots, k, v, lengths)
                   for size, slots in zip(layout.pool_sizes, layout.pool_slots))
  if layout.pool_queries:
    pooled = _prompt_queries(pooled, layout.pool_sizes, queries, lengths)
  pinned = None
  if layout.global_slots:
    if global_kv is None:
      raise ValueError('This layout keeps global keys/values: pass global_kv=.')
    pos = _ring_fill(lengths, layout.global_slots, 0, layout.global_slots)
    held = pos >= 0
    pinned = KVBuffer(_merge_rows(_gather_slots(global_kv[0], pos, held)),
                      _merge_rows(_gather_slots(global_kv[1], pos, held)), pos)
  return LayerCache(window, pooled, layout, pinned)


def _open_sum(x, lengths, size):
  """Float32 sum over each row's open group, tokens [lengths // size * size, lengths)."""
  p = jnp.arange(x.shape[1])[None, :]
  tokens = (p >= (lengths // size * size)[:, None]) & (p < lengths[:, None])
  tokens = tokens.reshape(tokens.shape + (1,) * (x.ndim - 2))
  return jnp.sum(jnp.where(tokens, x.astype(jnp.float32), 0.0), axis=1)


def _summaries_from_prompt(size: int, slots: int, summary_k, summary_v, x,
                           lengths) -> PooledBuffer:
  b, _, hk, d = summary_k.shape
  group = _ring_fill(lengths // size, 0, slots, slots)
  held = group >= 0
  if summary_k.shape[1] == 0:  # a prompt shorter than one block
    empty = jnp.zeros((b, hk, slots, d), summary_k.dtype)
    keys = values = empty
  else:
    keys, values = _gather_slots(summary_k, group, held), _gather_slots(summary_v, group, held)
  return PooledBuffer(keys, values, group, None, None, _open_sum(x, lengths, size))


def _pooled_from_prompt(size: int, slots: int, k, v, lengths) -> PooledBuffer:
  b, length, hk, d = k.shape
  groups = -(-length // size)
  pad = groups * size - length

  def means(x):
    x32 = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return (x32.reshape(b, groups, size, hk, d).sum(axis=2) / size).astype(x.dtype)

  group = _ring_fill(lengths // size, 0, slots, slots)
  held = group >= 0
  return PooledBuffer(_gather_slots(means(k), group, held), _gather_slots(means(v), group, held),
                      group, _open_sum(k, lengths, size), _open_sum(v, lengths, size))


def _rows_set(buffer, index, value):
  """buffer[r, index[r]] = value[r] for every row r of a [b, slots] buffer."""
  rows = jnp.arange(buffer.shape[0])
  return buffer.at[rows, index].set(value.astype(buffer.dtype))


def _set_slot(buffer, slot, value):
  """buffer[r, :, slot[r]] = value[r] for a [b, kv_heads, slots, d] buffer."""
  rows = jnp.arange(buffer.shape[0])
  return _constrain(buffer.at[rows, :, slot].set(value.astype(buffer.dtype)))


def _get_slot(buffer, slot):
  """buffer[r, :, slot[r]] -> [b, kv_heads, d]."""
  return buffer[jnp.arange(buffer.shape[0]), :, slot]


def append(cache: LayerCache, k, v, positions, *, x=None,
           summarize: Optional[Callable] = None, global_kv=None, q=None) -> LayerCache:
  """Adds the keys and values of one token per row at `positions`.

  k, v: [batch, kv_heads, head_dim]; positions: [batch] int32, each one past
  the last position the row's cache holds. For summaries formed from inputs:
  x [batch, emb] the token's layer input and summarize(sum [batch, emb]) ->
  (k, v) [batch, kv_heads, head_dim] the layer's summary projection. For
  layouts with global_slots: global_kv, the token's global-projection (k, v).
  For layouts with pool_queries: q [batch, heads, head_dim] the token's query.
  """
  layout = cache.layout
  positions = jnp.asarray(positions, jnp.int32)
  if layout.ring == 0:
    slot = positions
  else:
    ring_slot = layout.pinned + (positions - layout.pinned) % layout.ring
    slot = jnp.where(positions < layout.pinned, positions, ring_slot)
  w = cache.window
  if w.k_scale is None:
    window = KVBuffer(_write_slot(w.k, slot, k), _write_slot(w.v, slot, v),
                      _rows_set(w.pos, slot, positions))
  else:  # int8: the token's key and value quantized with their own scales
    (qk, sk), (qv, sv) = quantize(k), quantize(v)
    window = KVBuffer(_write_slot(w.k, slot, qk), _write_slot(w.v, slot, qv),
                      _rows_set(w.pos, slot, positions),
                      _write_slot(w.k_scale, slot, sk), _write_slot(w.v_scale, slot, sv))
  if layout.pool_from_inputs:
    if x is None or summarize is None:
      raise ValueError('This layout forms its summaries from inputs: pass x= and summarize=.')
    pooled = tuple(_append_summary(buffer, size, x, positions, summarize)
                   for buffer, size in zip(cache.pooled, layout.pool_sizes))
  else:
    pooled = tuple(_append_pooled(buffer, size, k, v, positions)
                   for buffer, size in zip(cache.pooled, layout.pool_sizes))
  if layout.pool_queries:
    pooled = _append_queries(pooled, cache.pooled, layout.pool_sizes, q, positions)
  pinned = cache.global_kv
  if layout.global_slots:
    if global_kv is None:
      raise ValueError('This layout keeps global keys/values: pass global_kv=.')
    # Only positions < global_slots are kept: later rows keep their buffer.
    kept = positions < layout.global_slots
    slot = jnp.minimum(positions, layout.global_slots - 1)
    rows = jnp.arange(positions.shape[0])
    keep = lambda new, old: jnp.where(kept.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    old = pinned.heads()
    pinned = KVBuffer(
        _write_slot(pinned.k, slot, keep(global_kv[0], _get_slot(old.k, slot))),
        _write_slot(pinned.v, slot, keep(global_kv[1], _get_slot(old.v, slot))),
        _rows_set(pinned.pos, slot, keep(positions, old.held[rows, slot])))
  return cache.replace(window=window, pooled=pooled, global_kv=pinned)


def _close_groups(buffer: PooledBuffer, size: int, positions, key, value):
  """Writes key/value [b, kv_heads, d] as the group of rows whose token closes it.

  Returns (k, v, group) of the buffer and keep(new, old), which picks `new` in
  the rows that closed a group.
  """
  closes = (positions + 1) % size == 0  # this token completes its group
  group = positions // size
  slot = group % buffer.group.shape[1]
  rows = jnp.arange(positions.shape[0])
  keep = lambda new, old: jnp.where(closes.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  new_k = _set_slot(buffer.k, slot, keep(key.astype(buffer.k.dtype), _get_slot(buffer.k, slot)))
  new_v = _set_slot(buffer.v, slot, keep(value.astype(buffer.v.dtype),
                                         _get_slot(buffer.v, slot)))
  new_group = _rows_set(buffer.group, slot, keep(group, buffer.group[rows, slot]))
  return new_k, new_v, new_group, keep


def _append_pooled(buffer: PooledBuffer, size: int, k, v, positions) -> PooledBuffer:
  sum_k = buffer.sum_k + k.astype(jnp.float32)
  sum_v = buffer.sum_v + v.astype(jnp.float32)
  new_k, new_v, group, keep = _close_groups(buffer, size, positions, sum_k / size, sum_v / size)
  return PooledBuffer(new_k, new_v, group, keep(jnp.zeros_like(sum_k), sum_k),
                      keep(jnp.zeros_like(sum_v), sum_v))


def _append_summary(buffer: PooledBuffer, size: int, x, positions, summarize) -> PooledBuffer:
  sum_x = buffer.sum_x + x.astype(jnp.float32)
  key, value = summarize(sum_x)
  new_k, new_v, group, keep = _close_groups(buffer, size, positions, key, value)
  return PooledBuffer(new_k, new_v, group, None, None, keep(jnp.zeros_like(sum_x), sum_x))


def _prompt_queries(pooled, sizes, queries, lengths):
  """Each buffer's query of its open group's first position after the prompt."""
  if queries is None:
    raise ValueError('This layout keeps the queries of group starts: pass queries=.')
  rows = jnp.arange(queries.shape[0])
  # A group opening at `lengths` itself gets its query from the next append.
  first = lambda size: jnp.minimum(lengths // size * size, queries.shape[1] - 1)
  return tuple(p._replace(query=queries[rows, first(size)]) for p, size in zip(pooled, sizes))


def _append_queries(pooled, old, sizes, q, positions):
  """Rows whose token opens a group keep its query for the group (old: the
  buffers before the token)."""
  if q is None:
    raise ValueError('This layout keeps the queries of group starts: pass q=.')
  opens = lambda size: (positions % size == 0)[:, None, None]
  return tuple(p._replace(query=jnp.where(opens(size), q.astype(o.query.dtype), o.query))
               for p, o, size in zip(pooled, old, sizes))


def attend(cache: LayerCache, q, positions, *, kind: KindSpec, settings, bias_fn=None,
           **extra):
  """Attention of one query per row at `positions` [b] over its cache.

  q: [batch, heads, head_dim] (after RoPE); kind and settings: the layer's
  registry entry and its settings, whose decode rule picks the visible slots;
  extra: what the model supplies to the rule (adaptive spans). The cache must
  already hold the query's own key (call `append` first). Returns
  [batch, heads, head_dim].
  """
  positions = jnp.asarray(positions, jnp.int32)
  pooled = tuple(Slots(p.k, p.v, p.group, p.query) for p in cache.pooled)
  groups = kind.decode_keys(settings, cache.window.heads(q.dtype), pooled, positions, **extra)
  return cached.attend(q, groups, bias_fn=bias_fn)


def nbytes(caches) -> int:
  """Bytes of every array in a cache (or any pytree of caches)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(caches)))
