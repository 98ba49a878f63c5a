"""Key/value caches for decoding token by token, one per self-attention layer.

A cache is a position-tagged buffer: keys and values [batch, kv_heads, slots,
head_dim] (keys after RoPE at their absolute position; heads-major, so that a
query's scores are one batched matrix-vector product over contiguous keys)
and the absolute position held by each slot (-1 = empty). A position p goes to slot

    p                                   if p < pinned
    pinned + (p - pinned) % ring        otherwise (a ring buffer),

so a cache of `pinned + ring` slots holds the pinned positions and the last
`ring` others. A query at position t attends the slots its kind allows, with
a mask computed from the slot positions exactly as the blocked kernel defines
the kind (see each kernel's module docstring):

  kind              slots                         a query at t sees
  full              pinned = max_length            every p <= t
  local             ring = radius + 1              t - radius <= p <= t
  global_local      pinned num_global + ring r+1   p < num_global or t - p <= radius
  adaptive_span     ring = max_span + 1            t - p <= max_span, soft span weight
  chunked           ring = block_size              p // block_size == t // block_size
  transient_global  ring r+1, + one summary per    the window, + the summary of every
                    block of block_size            block c with (c + 1) * block_size <= t
  hierarchical      ring 2b, + per level l a       level 0: p >= (t // b - 1) * b; level l:
                    ring of 2b group means of 2^l  the coarse keys `hierarchical` gives t

Memory is O(radius) for local, global_local, adaptive_span and chunked however
long the generation; O(block_size * log(length / block_size)) for
hierarchical; O(radius + length / block_size) for transient_global (its
summaries are as many as the kernel uses); O(length) for full.

Pooled keys (transient-global summaries, hierarchical coarse keys) are exact:
a running float32 sum of the current group's keys and values becomes the
group's mean when its last token arrives, as `_pooling.pool_groups` computes
it. Decoding assumes one document per row (no packing): prompts are
right-padded and `lengths` says where each ends.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from longjax import sharding
from longjax.attention import decoding
from longjax.attention.adaptive_span import soft_mask
from longjax.attention.hierarchical import num_levels
from longjax.attention.transient_global import summary_position

# Kinds whose causal form decodes with this cache (every kind in the registry).
DECODABLE_KINDS = ('full', 'local', 'global_local', 'adaptive_span', 'chunked',
                   'transient_global', 'hierarchical')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static shape and rule of one layer's cache (hashable; not traced)."""
  kind: str
  pinned: int                    # slots holding positions 0..pinned-1
  ring: int                      # ring slots for the positions after them
  pool_sizes: tuple[int, ...]    # tokens per pooled key, per pooled buffer
  pool_slots: tuple[int, ...]    # slots of each pooled buffer (a ring of group means)
  radius: int = 0
  num_global: int = 0
  block_size: int = 0
  max_span: int = 0
  ramp: float = 1.0

  @property
  def slots(self) -> int:
    return self.pinned + self.ring


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
  spec: LayerSpec = struct.field(pytree_node=False)


def layer_spec(config, kind: str, max_length: int) -> LayerSpec:
  """The cache layout of a layer of `kind` for positions 0..max_length-1.

  config: a `ModelConfig`. Rings never exceed max_length (a short generation
  with a long window keeps only what it can use).
  """
  if kind not in DECODABLE_KINDS:
    raise ValueError(f'No decoding cache for attention kind {kind!r}; decodable kinds: '
                     f'{", ".join(DECODABLE_KINDS)}.')
  if max_length < 1:
    raise ValueError(f'cache max_length must be >= 1; got {max_length}.')
  a = config.attention
  ring = lambda n: min(n, max_length)
  common = dict(kind=kind, radius=a.radius, num_global=a.num_global, block_size=a.block_size,
                max_span=a.max_span, ramp=float(a.span_ramp))
  if kind == 'full':
    return LayerSpec(pinned=max_length, ring=0, pool_sizes=(), pool_slots=(), **common)
  if kind == 'local':
    return LayerSpec(pinned=0, ring=ring(a.radius + 1), pool_sizes=(), pool_slots=(), **common)
  if kind == 'global_local':
    if a.global_tokens != 'prefix':
      raise ValueError("Decoding pins the first num_global positions (attention sinks); a "
                       "model trained with model.attention.global_tokens = 'marked' would need "
                       "every earlier key for each marked token. Evaluate it teacher-forced "
                       "(--mode=eval) instead.")
    pinned = min(a.num_global, max_length)
    return LayerSpec(pinned=pinned, ring=ring(a.radius + 1), pool_sizes=(), pool_slots=(),
                     **common)
  if kind == 'adaptive_span':
    return LayerSpec(pinned=0, ring=ring(a.max_span + 1), pool_sizes=(), pool_slots=(), **common)
  if kind == 'chunked':
    return LayerSpec(pinned=0, ring=ring(a.block_size), pool_sizes=(), pool_slots=(), **common)
  if kind == 'transient_global':
    summaries = -(-max_length // a.block_size)
    return LayerSpec(pinned=0, ring=ring(a.radius + 1), pool_sizes=(a.block_size,),
                     pool_slots=(summaries,), **common)
  # hierarchical: level 0 sees whole blocks N0 - 1 and N0; level l >= 1 sees at
  # most 2 * block_size coarse keys of 2^l tokens (module docstring).
  b = a.block_size
  levels = num_levels(max_length, b)
  sizes = tuple(2 ** level for level in range(1, levels + 1))
  slots = tuple(min(2 * b, -(-max_length // f)) for f in sizes)
  return LayerSpec(pinned=0, ring=ring(2 * b), pool_sizes=sizes, pool_slots=slots, **common)


def _constrain(buffer):
  return sharding.constrain(buffer, ('batch', 'kv_heads', 'kv_length', 'kv'))


def init(spec: LayerSpec, batch: int, kv_heads: int, head_dim: int, dtype) -> LayerCache:
  """An empty cache."""
  zeros = lambda slots: jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
  window = KVBuffer(zeros(spec.slots), zeros(spec.slots),
                    jnp.full((batch, spec.slots), -1, jnp.int32))
  sums = lambda: jnp.zeros((batch, kv_heads, head_dim), jnp.float32)
  pooled = tuple(PooledBuffer(zeros(n), zeros(n), jnp.full((batch, n), -1, jnp.int32), sums(),
                              sums()) for n in spec.pool_slots)
  return LayerCache(window, pooled, spec)


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


def from_prompt(spec: LayerSpec, k, v, lengths) -> LayerCache:
  """The cache after a prompt, from the keys and values the prefill computed.

  k, v: [batch, prompt_len, kv_heads, head_dim] (keys after RoPE); lengths:
  [batch] int, the real prompt length of each row (>= 1; later positions are
  padding and are not cached).
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  pos = _ring_fill(lengths, spec.pinned, spec.ring, spec.slots)
  held = pos >= 0
  window = KVBuffer(_gather_slots(k, pos, held), _gather_slots(v, pos, held), pos)
  pooled = tuple(_pooled_from_prompt(size, slots, k, v, lengths)
                 for size, slots in zip(spec.pool_sizes, spec.pool_slots))
  return LayerCache(window, pooled, spec)


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
  spec = cache.spec
  positions = jnp.asarray(positions, jnp.int32)
  if spec.ring == 0:
    slot = positions
  else:
    ring_slot = spec.pinned + (positions - spec.pinned) % spec.ring
    slot = jnp.where(positions < spec.pinned, positions, ring_slot)
  w = cache.window
  window = KVBuffer(_set_slot(w.k, slot, k), _set_slot(w.v, slot, v),
                    _rows_set(w.pos, slot, positions))
  pooled = tuple(_append_pooled(buffer, size, k, v, positions)
                 for buffer, size in zip(cache.pooled, spec.pool_sizes))
  return LayerCache(window, pooled, spec)


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


def _window_mask(spec: LayerSpec, pos, t):
  """Which window slots a query at t [b] sees, from their positions [b, slots]."""
  t = t[:, None]
  seen = (pos >= 0) & (pos <= t)
  if spec.kind == 'full':
    return seen
  if spec.kind in ('local', 'transient_global'):
    return seen & (t - pos <= spec.radius)
  if spec.kind == 'global_local':
    return seen & ((pos < spec.num_global) | (t - pos <= spec.radius))
  if spec.kind == 'adaptive_span':
    return seen & (t - pos <= spec.max_span)
  if spec.kind == 'chunked':
    return seen & (pos // spec.block_size == t // spec.block_size)
  if spec.kind == 'hierarchical':
    return seen & (pos >= (t // spec.block_size - 1) * spec.block_size)
  raise ValueError(f'No decoding cache for attention kind {spec.kind!r}.')


def _summary_group(spec: LayerSpec, buffer: PooledBuffer, t) -> decoding.KeyGroup:
  """transient_global: the summaries of blocks that ended before the query."""
  c = buffer.group
  size = spec.block_size
  mask = (c >= 0) & ((c + 1) * size <= t[:, None])
  rel = t[:, None] - summary_position(c, size)
  return decoding.KeyGroup(buffer.k, buffer.v, mask, rel=rel)


def _level_group(spec: LayerSpec, level: int, buffer: PooledBuffer, t) -> decoding.KeyGroup:
  """hierarchical level >= 1: the coarse keys `_coarse_level` gives a causal query at t."""
  b = spec.block_size
  f = 2 ** level
  w = b * f
  t = t[:, None]
  c = buffer.group
  level_block = t // w
  half = (t - level_block * w) // (w // 2)  # the level-(l-1) block of the query (0 or 1)
  tc = c - level_block * b                  # coarse keys after the level block's start
  finer = ((half - 1) * b // 2 <= tc) & (tc < (half + 2) * b // 2)
  mask = ((c >= 0) & ((level_block - 1) * b <= c) & (c < (level_block + 1) * b) & ~finer
          & (c * f + f - 1 <= t))
  log_count = jnp.full(c.shape, math.log(f), jnp.float32)
  return decoding.KeyGroup(buffer.k, buffer.v, mask, rel=t - c * f - f // 2,
                           log_weight=log_count)


def attend(cache: LayerCache, q, positions, *, bias_fn=None, spans=None):
  """Attention of one query per row at `positions` [b] over its cache.

  q: [batch, heads, head_dim] (after RoPE); spans: [heads] adaptive spans in
  tokens (adaptive_span only). The cache must already hold the query's own
  key (call `append` first). Returns [batch, heads, head_dim].
  """
  spec = cache.spec
  positions = jnp.asarray(positions, jnp.int32)
  w = cache.window
  mask = _window_mask(spec, w.pos, positions)
  rel = positions[:, None] - w.pos
  weight = None
  if spec.kind == 'adaptive_span':
    if spans is None:
      raise ValueError('adaptive_span decoding needs the spans of the heads.')
    spans = jnp.clip(jnp.asarray(spans, jnp.float32), 0.0, spec.max_span)
    weight = jnp.moveaxis(soft_mask(rel, spans, spec.ramp), 0, 1)  # [b, h, s]
    mask = mask[:, None, :] & (weight > 0)
  groups = [decoding.KeyGroup(w.k, w.v, mask, rel=rel, weight=weight)]
  if spec.kind == 'transient_global':
    groups.append(_summary_group(spec, cache.pooled[0], positions))
  elif spec.kind == 'hierarchical':
    groups += [_level_group(spec, level, buffer, positions)
               for level, buffer in enumerate(cache.pooled, start=1)]
  return decoding.attend(q, groups, bias_fn=bias_fn)


def nbytes(caches) -> int:
  """Bytes of every array in a cache (or any pytree of caches)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(caches)))
