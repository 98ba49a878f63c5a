"""Key/value caches for decoding token by token, one per self-attention layer.

A cache is a position-tagged buffer: keys and values [batch, kv_heads, slots,
head_dim] (keys after RoPE at their absolute position; heads-major, so that a
query's scores are one batched matrix-vector product over contiguous keys)
and the absolute position held by each slot (-1 = empty). A position p goes to slot

    p                                   if p < pinned
    pinned + (p - pinned) % ring        otherwise (a ring buffer),

so a cache of `pinned + ring` slots holds the pinned positions and the last
`ring` others. Pooled buffers hold the means of groups of consecutive tokens
(transient-global summaries, hierarchical coarse keys) in rings of their own:
exact, since a running float32 sum of the open group's keys and values
becomes the group's mean when its last token arrives, as the kernels pool.

This module knows no attention kind. How many slots of each sort a layer
keeps (`CacheLayout`) and which of them a query at t sees (`decode_keys`)
are the kind's decoding rule, in its registry entry (`longjax.attention`),
written beside its kernel; `attend` hands the buffers to that rule. Memory is
O(window) for the windowed kinds however long the generation (see each
kind's `cache_layout`). Decoding assumes one document per row (no packing):
prompts are right-padded and `lengths` says where each ends.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from longjax import sharding
from longjax.attention import cached
from longjax.attention.spec import CacheLayout, KindSpec, Slots


class KVBuffer(NamedTuple):
  """k, v: [batch, kv_heads, slots, head_dim]; pos: [batch, slots] int32 (-1 empty)."""
  k: jax.Array
  v: jax.Array
  pos: jax.Array


class PooledBuffer(NamedTuple):
  """Means of groups of `size` tokens in a ring of slots, and the open group's sums.

  k, v: [batch, kv_heads, slots, head_dim] group means; group: [batch, slots]
  int32 index c of the group held (tokens [c * size, (c + 1) * size)), -1 empty;
  sum_k, sum_v: [batch, kv_heads, head_dim] float32 sums of the open group so far.
  """
  k: jax.Array
  v: jax.Array
  group: jax.Array
  sum_k: jax.Array
  sum_v: jax.Array


@struct.dataclass
class LayerCache:
  """The cache of one self-attention layer: a window buffer and pooled buffers."""
  window: KVBuffer
  pooled: tuple[PooledBuffer, ...]
  layout: CacheLayout = struct.field(pytree_node=False)


def _constrain(buffer):
  return sharding.constrain(buffer, ('batch', 'kv_heads', 'kv_length', 'kv'))


def init(layout: CacheLayout, batch: int, kv_heads: int, head_dim: int, dtype) -> LayerCache:
  """An empty cache."""
  zeros = lambda slots: jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
  window = KVBuffer(zeros(layout.slots), zeros(layout.slots),
                    jnp.full((batch, layout.slots), -1, jnp.int32))
  sums = lambda: jnp.zeros((batch, kv_heads, head_dim), jnp.float32)
  pooled = tuple(PooledBuffer(zeros(n), zeros(n), jnp.full((batch, n), -1, jnp.int32), sums(),
                              sums()) for n in layout.pool_slots)
  return LayerCache(window, pooled, layout)


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


def from_prompt(layout: CacheLayout, k, v, lengths) -> LayerCache:
  """The cache after a prompt, from the keys and values the prefill computed.

  k, v: [batch, prompt_len, kv_heads, head_dim] (keys after RoPE); lengths:
  [batch] int, the real prompt length of each row (>= 1; later positions are
  padding and are not cached).
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  pos = _ring_fill(lengths, layout.pinned, layout.ring, layout.slots)
  held = pos >= 0
  window = KVBuffer(_gather_slots(k, pos, held), _gather_slots(v, pos, held), pos)
  pooled = tuple(_pooled_from_prompt(size, slots, k, v, lengths)
                 for size, slots in zip(layout.pool_sizes, layout.pool_slots))
  return LayerCache(window, pooled, layout)


def _pooled_from_prompt(size: int, slots: int, k, v, lengths) -> PooledBuffer:
  b, length, hk, d = k.shape
  groups = -(-length // size)
  pad = groups * size - length

  def means(x):
    x32 = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return (x32.reshape(b, groups, size, hk, d).sum(axis=2) / size).astype(x.dtype)

  complete = lengths // size
  group = _ring_fill(complete, 0, slots, slots)
  held = group >= 0
  # The open group: tokens [complete * size, length).
  p = jnp.arange(length)[None, :]
  open_tokens = (p >= (complete * size)[:, None]) & (p < lengths[:, None])

  def open_sum(x):
    return jnp.sum(jnp.where(open_tokens[:, :, None, None], x.astype(jnp.float32), 0.0), axis=1)

  return PooledBuffer(_gather_slots(means(k), group, held), _gather_slots(means(v), group, held),
                      group, open_sum(k), open_sum(v))


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


def append(cache: LayerCache, k, v, positions) -> LayerCache:
  """Adds the keys and values of one token per row at `positions`.

  k, v: [batch, kv_heads, head_dim]; positions: [batch] int32, each one past
  the last position the row's cache holds.
  """
  layout = cache.layout
  positions = jnp.asarray(positions, jnp.int32)
  if layout.ring == 0:
    slot = positions
  else:
    ring_slot = layout.pinned + (positions - layout.pinned) % layout.ring
    slot = jnp.where(positions < layout.pinned, positions, ring_slot)
  w = cache.window
  window = KVBuffer(_set_slot(w.k, slot, k), _set_slot(w.v, slot, v),
                    _rows_set(w.pos, slot, positions))
  pooled = tuple(_append_pooled(buffer, size, k, v, positions)
                 for buffer, size in zip(cache.pooled, layout.pool_sizes))
  return LayerCache(window, pooled, layout)


def _append_pooled(buffer: PooledBuffer, size: int, k, v, positions) -> PooledBuffer:
  sum_k = buffer.sum_k + k.astype(jnp.float32)
  sum_v = buffer.sum_v + v.astype(jnp.float32)
  closes = (positions + 1) % size == 0  # this token completes its group
  group = positions // size
  slot = group % buffer.group.shape[1]
  rows = jnp.arange(positions.shape[0])
  keep = lambda new, old: jnp.where(closes.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  mean_k = (sum_k / size).astype(buffer.k.dtype)
  mean_v = (sum_v / size).astype(buffer.v.dtype)
  new_k = _set_slot(buffer.k, slot, keep(mean_k, _get_slot(buffer.k, slot)))
  new_v = _set_slot(buffer.v, slot, keep(mean_v, _get_slot(buffer.v, slot)))
  new_group = _rows_set(buffer.group, slot, keep(group, buffer.group[rows, slot]))
  return PooledBuffer(new_k, new_v, new_group, keep(jnp.zeros_like(sum_k), sum_k),
                      keep(jnp.zeros_like(sum_v), sum_v))


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
  w = cache.window
  pooled = tuple(Slots(p.k, p.v, p.group) for p in cache.pooled)
  groups = kind.decode_keys(settings, Slots(w.k, w.v, w.pos), pooled, positions, **extra)
  return cached.attend(q, groups, bias_fn=bias_fn)


def nbytes(caches) -> int:
  """Bytes of every array in a cache (or any pytree of caches)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(caches)))
