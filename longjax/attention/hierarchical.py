"""H-Transformer-1D hierarchical attention (Zhu & Soricut 2021), linear cost.

The method of the paper and of its reference code, google/flaxformer
(`architectures/h_transformer/h_attention.py`, `token_hierarchy.py`): queries,
keys and values are coarsened level by level, every level attends only the
blocks next to the diagonal of its own (coarse) attention matrix, and the
coarse outputs are interpolated back to the tokens. For the variant that
scores every token's *own* query against the coarse keys (more accurate,
O(L b log(L/b))), see `multiresolution`.

Notation: b = level0_block (even; flaxformer's `num_clusters`), f = 2^l the
tokens per coarse token at level l, p_l(i) = i // f the level-l coarse token
of token i, and blocks of b coarse tokens at every level, N_l(i) = p_l(i) // b.
Positions are relative to the segment's first token (see packing below).

Coarsening (flaxformer `hierarchical_coarsen`; the paper's restriction
operators): the level-l coarse token c stands for the tokens
G_l(c) = [c f, (c + 1) f) of the segment, m_l(c) = |G_l(c)| of them (a
segment's last group may be partial):
  * key    K_l(c) = mean of k_j over G_l(c)                   (average)
  * value  V_l(c) = sum  of v_j over G_l(c) = m_l(c) * mean v (sum)
  * query  Q_l(c) = mean of q_j over G_l(c) bidirectionally; causally the
    query of the group's FIRST position, q_{c f} (flaxformer's
    `use_sample=decoder_only`: "to avoid leakage from future positions").
Level 0 is the tokens themselves.

Which coarse keys a coarse query scores (flaxformer's ANCHOR/LEFT/RIGHT
blocks and `_gen_correction_mask`), for coarse query p, key c at level l:
  * level 0: block(c) in {block(p) - 1, block(p), block(p) + 1}; causally
    block(c) in {block(p) - 1, block(p)} and c <= p (the ANCHOR is tril-masked).
  * level l >= 1: only the sub-diagonal block, block(c) = block(p) - 1 (LEFT),
    and bidirectionally the super-diagonal block, block(c) = block(p) + 1
    (RIGHT) — never the diagonal block, which level l - 1 covers — minus the
    correction mask, which removes what level l - 1 already covers:
    LEFT pairs with p in the first half of its block (p % b < b/2) and c in the
    second half of its block (c % b >= b/2); RIGHT pairs with p in the second
    half and c in the first half.
So every key token j is covered at exactly one level for token i (the regions
R_l(i) = [(N_l - 1) b f, (N_l + 2) b f) are nested; level l covers
R_l \\ R_{l-1}), the same key sets as `multiresolution`; a causal query only
ever scores coarse keys of groups that end before its coarse query's position.

What query i receives (flaxformer `_hierarchical_attention_fn`,
`_multiply_attention_value`, `_compute_softmax_partition`; in the paper's
terms Z = D^-1 Y with Y = A V and the row sums D = diag(A 1) both
approximated hierarchically: coarse blocks of A at every level, restriction
(coarsening) of Q, K, V down the levels and prolongation (interpolation) of
the coarse products back up, nested level by level):

    s_l(p, c) = Q_l(p) . K_l(c) * scale  (+ bias_fn((p - c) * f))
    y_l(p)    = sum_{c visible to p at level l} exp(s_l(p, c)) V_l(c)
    z_l(p)    = sum_{c visible to p at level l} exp(s_l(p, c)) m_l(c)
    out_i     = sum_l y_l(p_l(i)) / sum_l z_l(p_l(i))

i.e. every level's numerator y and denominator z are interpolated to the
tokens piecewise constantly (flaxformer `interpolate_cumulative_sum` with its
default CONST kernel of size 2: each coarse row repeated 2x per level, summed
level by level), and all levels are normalised together, once, after the
interpolation. Equivalently a coarse key enters the softmax with its mean
value and log m_l(c) added to its score. (Flaxformer subtracts one global max
from all scores; here every softmax part carries its own max and the parts are
merged exactly — mathematically the same.)

Levels (flaxformer `TokenHierarchy`): a segment of n tokens is treated as if
padded to b 2^m, the smallest such length >= n with m >= 1 (flaxformer needs
the length to be b times a power of 2); it has levels 0..m-1. Equivalently
coarse levels go up to the smallest l with 2 b 2^l >= n, and n <= 2b is exactly
full attention. A segment with n <= b 2^l gets nothing from level l (level
l - 1 already covers every pair), so the kernel skips it there.

Position bias (`bias_fn`; flaxformer's own is a learned hierarchical relative
position bias per block offset, not implemented here): level 0 gets
bias_fn(i - j); a coarse pair (p, c) at level l gets bias_fn((p - c) * f),
the distance between the two groups' first (equivalently middle) positions.

Packing: with `segment_ids` (contiguous runs; padding is just another
segment) every segment gets its own hierarchy, groups and blocks aligned to
its first token, exactly as if it were alone in the row: the outputs of a
segment equal running it alone, at any offset.

How it stays linear: at level l >= 1 the coarse tokens of the segments that
need the level are laid out in a compact array, each segment's run padded to
whole blocks of b and aligned to a block boundary, so that block C of the
array is one block of one segment and its LEFT/RIGHT blocks are blocks C - 1
and C + 1 (when they hold the same segment). With n_s > b f for each of the k
segments that need level l, sum_s ceil(n_s / (b f)) <= L / (b f) + k and
k <= L / (b f + 1), so K_l = floor(L / (b f)) + floor(L / (b f + 1)) blocks
always suffice (without segment_ids: ceil(L / (b f))). Level l builds its
coarse tokens from level l - 1's (pairs of children) and hands its combined
softmax statistics down to level l - 1 the same way, so every array is
O(L b) (scores) or O(L d): cost O(L b), time and memory, forward and backward.

`level0_visible` and `coarse_visible` state who sees whom; the kernel builds
its tile masks and the decode rule its slot masks from them.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from longjax.attention import _core, implementations, spec
from longjax.attention.local import ring_length, window_group, window_part


def num_levels(length: int, level0_block: int) -> int:
  """Coarse levels above level 0 for `length` tokens: the smallest l with
  2 * b * 2^l >= length (flaxformer's num_level - 1 for length padded to b 2^m)."""
  levels = 0
  while 2 * level0_block * 2 ** levels < length:
    levels += 1
  return levels


def level0_visible(query_pos, key_pos, level0_block: int, *, causal: bool):
  """Level 0 (segment-relative positions): blocks N_0 - 1, N_0 and,
  bidirectionally, N_0 + 1 of the query's block N_0; causally only j <= i."""
  query_block, key_block = query_pos // level0_block, key_pos // level0_block
  visible = (key_block >= query_block - 1) & (key_block <= query_block + (0 if causal else 1))
  if causal:
    visible = visible & (key_pos <= query_pos)
  return visible


def coarse_visible(query_group, key_group, level0_block: int, *, causal: bool):
  """Level l >= 1 (the same rule at every level): whether coarse query p scores
  coarse key c (segment-relative coarse indices, numpy or jax ints).

  The LEFT block (block(c) = block(p) - 1) except first-half queries with
  second-half keys, and bidirectionally the RIGHT block (block(p) + 1) except
  second-half queries with first-half keys (flaxformer's correction mask).
  """
  b, half = level0_block, level0_block // 2
  query_block, key_block = query_group // b, key_group // b
  query_first = query_group % b < half
  key_first = key_group % b < half
  left = (key_block == query_block - 1) & ~(query_first & ~key_first)
  if causal:
    return left
  right = (key_block == query_block + 1) & ~(~query_first & key_first)
  return left | right


def _empty_row(part: _core.Part) -> _core.Part:
  """Appends one query slot that sees nothing (max MASK_VALUE, sums 0)."""
  pad = lambda x, value: jnp.concatenate(
      [x, jnp.full(x.shape[:3] + (1,) + x.shape[4:], value, x.dtype)], axis=3)
  return _core.Part(pad(part.max, _core.MASK_VALUE), pad(part.sum, 0.0), pad(part.out, 0.0))


# Layouts of the coarse tokens: how level l's slots derive from level l-1's.
class _Level(NamedTuple):
  chunks: int                      # K_l blocks of b slots
  parent: Optional[jax.Array]      # [batch, M_{l-1}] level-l slot of each level-(l-1) slot
                                   # (M_l: none); None: slot // 2 (no segments)
  first: Optional[jax.Array]       # [batch, M_{l-1}] bool: first child of its parent
  chunk_segment: Optional[jax.Array]  # [batch, K_l] segment of each block, -1 unused
  count: jax.Array                 # [batch or 1, M_l] float32 tokens per slot


def _static_levels(length: int, b: int, levels: int) -> list:
  """One segment (no segment_ids): slot = segment-relative coarse index."""
  out = []
  for level in range(1, levels + 1):
    f = 2 ** level
    chunks = -(-length // (b * f))
    starts = np.arange(chunks * b) * f
    count = np.clip(length - starts, 0, f).astype(np.float32)[None]
    out.append(_Level(chunks, None, None, None, jnp.asarray(count)))
  return out


def _segment_levels(segment_ids, length: int, b: int, levels: int):
  """Every segment its own hierarchy: compact block-aligned slots per level.

  Returns (levels, start): start [batch, l] each token's segment start.
  """
  batch = segment_ids.shape[0]
  start, end = _core.segment_bounds(segment_ids)
  pos = jnp.arange(length, dtype=jnp.int32)[None, :]
  n, rel = end - start, pos - start
  is_first = pos == start
  out, prev_slot, prev_size = [], None, length
  for level in range(1, levels + 1):
    f = 2 ** level
    chunks = length // (b * f) + length // (b * f + 1)
    size = chunks * b
    needs = n > b * f  # else level l - 1 already covers the whole segment
    own = jnp.where(needs, -(-n // (b * f)), 0)
    # Blocks before the segment (a running sum: per shard on a sequence mesh).
    offset = _core.cumulative(jnp.where(is_first, own, 0), 'add') - own
    slot = jnp.where(needs, offset * b + rel // f, size)
    chunk_segment = _core.scatter_rows(slot // b, start, chunks, -1)
    is_even = (rel // (f // 2)) % 2 == 0
    if prev_slot is None:
      parent, first = slot, is_even
    else:
      parent = _core.scatter_rows(prev_slot, slot, prev_size, size)
      first = _core.scatter_rows(prev_slot, is_even, prev_size, False)
    count = _core.scatter_rows(slot, jnp.ones((batch, length), jnp.float32), size, add=True)
    out.append(_Level(chunks, parent, first, chunk_segment, count))
    prev_slot, prev_size = slot, size
  return out, start


def _coarsen(x, level: _Level, size: int, axis: int, *, select=None):
  """Sums level-(l-1) slots into their level-l parent slots along `axis`.

  x: [batch, ..., M_{l-1} (axis), ...]; select [batch, M_{l-1}] bool: only
  those children (causal queries: the first child). Returns [..., size, ...].
  """
  n = x.shape[axis]
  if level.parent is None:  # slot // 2
    if select is not None:  # the first of each pair
      x = _core.pad_axis(x, axis, 2 * size)
      return jax.lax.slice_in_dim(x, 0, 2 * size, stride=2, axis=axis)
    x = _core.pad_axis(x, axis, 2 * size)
    shape = x.shape[:axis] + (size, 2) + x.shape[axis + 1:]
    return x.reshape(shape).sum(axis=axis + 1)
  index = level.parent if select is None else jnp.where(select, level.parent, size)
  assert index.shape[1] == n

  def one(xb, ib):
    xb = jnp.moveaxis(xb, axis - 1, 0)
    out = jnp.zeros((size,) + xb.shape[1:], xb.dtype).at[ib].add(xb, mode='drop')
    return jnp.moveaxis(out, 0, axis - 1)

  return jax.vmap(one)(x, index)


def _interpolate(part: _core.Part, level: _Level, size: int) -> _core.Part:
  """Level-l statistics [.., M_l] handed to the level-(l-1) slots [.., size]."""
  if level.parent is None:
    up = lambda x: jnp.repeat(x, 2, axis=3)[:, :, :, :size]
    return _core.Part(up(part.max), up(part.sum), up(part.out))
  part = _empty_row(part)
  index = level.parent[:, None, None, :]
  take = lambda x, i: jnp.take_along_axis(x, i, axis=3)
  return _core.Part(take(part.max, index), take(part.sum, index),
                    take(part.out, index[..., None]))


def _shift(x, axis: int, by: int):
  """x shifted along `axis` so that out[C] = x[C - by] (zeros where missing)."""
  n = x.shape[axis]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (by, 0) if by > 0 else (0, -by)
  padded = jnp.pad(x, widths)
  start = 0 if by > 0 else -by
  return jax.lax.slice_in_dim(padded, start, start + n, axis=axis)


def _coarse_part(ql, kl, vl, level: _Level, *, level_index: int, block: int, causal: bool,
                 bias_fn) -> _core.Part:
  """Level l's coarse queries against their LEFT (and RIGHT) blocks of coarse keys."""
  b = block
  f = 2 ** level_index
  batch, hk, g, size, d = ql.shape
  chunks = level.chunks
  qb = jnp.swapaxes(ql.reshape(batch, hk, g, chunks, b, d), 2, 3)  # [B, hk, K, g, b, d]
  blocked = lambda x, axis: x.reshape(x.shape[:axis] + (chunks, b) + x.shape[axis + 1:])

  def window(x, axis):  # [.., K (axis), b, ..] -> [.., K, W, ..]: LEFT (, RIGHT) blocks
    left = _shift(x, axis, 1)
    return left if causal else jnp.concatenate([left, _shift(x, axis, -1)], axis=axis + 1)

  kw, vw = window(blocked(kl, 2), 2), window(blocked(vl, 2), 2)  # [B, hk, K, W, d]
  count = window(blocked(jnp.broadcast_to(level.count, (batch, size)), 1), 1)  # [B, K, W]
  width = b if causal else 2 * b

  # Static geometry of a tile: query r of block C is coarse index C b + r (minus
  # the segment's offset); key t < b of the window is (C - 1) b + t (LEFT),
  # key t >= b is (C + 1) b + t - b (RIGHT).
  r = np.arange(b)[:, None]
  t = np.arange(width)[None, :]
  is_left = t < b
  key = np.where(is_left, t, t - b + 2 * b)  # coarse index relative to block C - 1
  mask = coarse_visible(r + b, key, b, causal=causal)  # [b, W]
  rel = (r + b - key) * f  # (p - c) * f

  chunk = np.arange(chunks)
  if level.chunk_segment is None:
    left_ok = jnp.asarray(chunk >= 1)[None]
    right_ok = jnp.asarray(chunk + 1 < chunks)[None]
  else:
    seg = level.chunk_segment
    left_ok = (seg >= 0) & (seg == _shift(seg, 1, 1)) & (chunk >= 1)[None]
    right_ok = (seg >= 0) & (seg == _shift(seg, 1, -1)) & (chunk + 1 < chunks)[None]
  neighbour = jnp.where(jnp.asarray(is_left)[None, None], left_ok[:, :, None, None],
                        right_ok[:, :, None, None])  # [B, K, 1, W]
  mask = jnp.asarray(mask)[None, None] & neighbour & (count > 0)[:, :, None, :]  # [B, K, b, W]
  bias = None
  if bias_fn is not None:
    bias = _core.bias_tile(bias_fn, rel, hk)[None, :, None]
  log_count = jnp.log(jnp.maximum(count, 1.0))
  return _core.attend_blocks(qb, kw, vw, mask=mask[:, None, :, None], bias=bias,
                             log_weight=log_count[:, None, :, None, None, :])


def _coarse_levels(qh, kh, vh, levels: list, *, block: int, causal: bool, bias_fn):
  """All coarse levels' statistics, combined and interpolated to the tokens."""
  length = kh.shape[2]
  k_sum, v_sum = kh.astype(jnp.float32), vh.astype(jnp.float32)
  q_x = qh if causal else qh.astype(jnp.float32)
  parts, sizes = [], [length]
  for index, level in enumerate(levels, start=1):
    size = level.chunks * block
    k_sum = _coarsen(k_sum, level, size, 2)
    v_sum = _coarsen(v_sum, level, size, 2)
    if causal:  # the query of the group's first position
      q_x = _coarsen(q_x, level, size, 3,
                     select=True if level.parent is None else level.first)
    else:
      q_x = _coarsen(q_x, level, size, 3)
    safe = jnp.maximum(jnp.broadcast_to(level.count, (kh.shape[0], size)), 1.0)
    k_l = (k_sum / safe[:, None, :, None]).astype(kh.dtype)
    v_l = (v_sum / safe[:, None, :, None]).astype(vh.dtype)
    q_l = q_x if causal else (q_x / safe[:, None, None, :, None]).astype(qh.dtype)
    parts.append(_coarse_part(q_l, k_l, v_l, level, level_index=index, block=block,
                              causal=causal, bias_fn=bias_fn))
    sizes.append(size)
  # Top-down: each level's statistics join the finer level's, slot by slot.
  acc = parts[-1]
  for index in range(len(levels) - 1, 0, -1):
    acc = _core.combine(parts[index - 1], _interpolate(acc, levels[index], sizes[index]))
  return _interpolate(acc, levels[0], length)


def _level0_segments(qh, kh, vh, *, block: int, causal: bool, segment_ids, start, bias_fn):
  """Level 0 with every segment's blocks aligned to its first token.

  A key a query may see is within 2b - 1 positions of it, so each block of b
  queries is scored against its row blocks C - 2 .. C + 2 (causal C - 2 .. C),
  masked by the segment-relative block rule.
  """
  b, hk, g, length, d = qh.shape
  n = -(-length // block)
  padded = n * block
  before, after = min(2, n - 1), (0 if causal else min(2, n - 1))
  width = (before + 1 + after) * block
  qb = jnp.swapaxes(_core.pad_axis(qh, 3, padded).reshape(b, hk, g, n, block, d), 2, 3)
  blocks = lambda x, axis: _core.pad_axis(x, axis, padded).reshape(
      x.shape[:axis] + (n, block) + x.shape[axis + 1:])
  window = lambda x, axis: _core.neighbor_blocks(blocks(x, axis), before=before, after=after,
                                                 axis=axis)
  kw, vw = window(kh, 2), window(vh, 2)
  pos = jnp.arange(length, dtype=jnp.int32)[None, :]
  rel = pos - start
  key_pos = (np.arange(n)[:, None] - before) * block + np.arange(width)[None, :]
  in_row = jnp.asarray((key_pos >= 0) & (key_pos < length))[None, :, None, :]
  same = blocks(segment_ids, 1)[:, :, :, None] == window(segment_ids, 1)[:, :, None, :]
  mask = in_row & same & level0_visible(blocks(rel, 1)[:, :, :, None],
                                        window(rel, 1)[:, :, None, :], block, causal=causal)
  bias = None
  if bias_fn is not None:
    tile_rel = np.arange(block)[:, None] - np.arange(width)[None, :] + before * block
    bias = _core.bias_tile(bias_fn, tile_rel, hk)[None, :, None]
  part = _core.attend_blocks(qb, kw, vw, mask=mask[:, None, :, None], bias=bias)
  return _core.slice_part(part, length)


def hierarchical(q, k, v, *, level0_block: int, causal: bool = False, segment_ids=None,
                 bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None,
                 implementation: str = 'auto'):
  """H-Transformer-1D attention (Zhu & Soricut 2021): see the module docstring.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    level0_block: even block length b (flaxformer's num_clusters).
    causal: the decoder form (coarse query = first query of its group; LEFT
      blocks only).
    segment_ids: [batch, length] ints, contiguous runs; every segment gets its
      own hierarchy, as if alone.
    bias_fn: f(relative position) -> [..., heads]; coarse pairs at level l get
      (p - c) * 2^l (the distance between their groups).
    scale, implementation: as in `local`.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'hierarchical'
  qh, kh, vh, segment_ids, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  level0_block = _core.check_positive_int(level0_block, name, 'level0_block', minimum=2)
  if level0_block % 2:
    raise ValueError(f'{name}: level0_block must be even (levels halve it); got {level0_block}.')
  implementations.choose(implementation, name, supported=SPEC.implementations)
  b, length = level0_block, dims.length
  count = num_levels(length, b)

  if segment_ids is None:
    parts = [window_part(qh, kh, vh, block=b, before=1, after=0 if causal else 1, radius=None,
                         causal=causal, bias_fn=bias_fn)]
    levels = _static_levels(length, b, count)
  else:
    levels, start = _segment_levels(segment_ids, length, b, count)
    parts = [_level0_segments(qh, kh, vh, block=b, causal=causal, segment_ids=segment_ids,
                              start=start, bias_fn=bias_fn)]
  if levels:
    parts.append(_coarse_levels(qh, kh, vh, levels, block=b, causal=causal, bias_fn=bias_fn))
  return _core.merge(parts, q.dtype)


# Decoding (causal): level 0 keeps the last 2b positions (blocks N_0 - 1 and
# N_0); each coarse level a ring of at most 2b group means and the query of
# its open group's first position (the level's coarse query).
def levels_cache_layout(b: int, max_length: int, *, pool_queries: bool) -> spec.CacheLayout:
  """The last 2b positions, and per coarse level a ring of at most 2b group means
  (shared with `multiresolution`, which needs no coarse queries)."""
  sizes = tuple(2 ** level for level in range(1, num_levels(max_length, b) + 1))
  slots = tuple(min(2 * b, -(-max_length // f)) for f in sizes)
  return spec.CacheLayout(pinned=0, ring=ring_length(2 * b, max_length), pool_sizes=sizes,
                          pool_slots=slots, pool_queries=pool_queries)


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return levels_cache_layout(settings['level0_block'], max_length, pool_queries=True)


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  b = settings['level0_block']
  groups = [window_group(window, t, lambda query, key: level0_visible(query, key, b,
                                                                      causal=True))]
  for level, buffer in enumerate(pooled, start=1):
    f = 2 ** level
    c = buffer.held
    p = (t // f)[:, None]
    mask = (c >= 0) & coarse_visible(p, c, b, causal=True)
    # Visible groups end before p * f <= t: all full, m = f.
    groups.append(spec.KeyGroup(buffer.k, buffer.v, mask, rel=(p - c) * f,
                                log_weight=jnp.full(c.shape, math.log(f), jnp.float32),
                                query=buffer.query))
  return groups


SPEC = spec.KindSpec(
    'hierarchical', hierarchical, ('level0_block',), 'O(L b)',
    'H-Transformer-1D (Zhu & Soricut 2021)', cache_layout=cache_layout, decode_keys=decode_keys,
    tile=lambda settings: settings['level0_block'])
