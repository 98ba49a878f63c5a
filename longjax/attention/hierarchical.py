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

How it stays linear: at level l >= 1 the coarse tokens live in blocks of b
slots, one block of one segment per slot block, laid out by the layouts of
`_hierarchy`: without segment_ids slot = coarse index (ceil(L / (b f))
blocks); with them by position, two blocks per span of b f tokens (the first
block of the segment starting in the span, and a later block of the one
covering its first position), 2 ceil(L / (b f)) blocks, about 2L / f slots —
what a compact layout needs in the worst case too. Level l builds its coarse
tokens from level l - 1's (pairs of children) and hands its combined softmax
statistics down to level l - 1 the same way, so every array is O(L b)
(scores) or O(L d): cost O(L b), time and memory, forward and backward. The
positional layout keeps every level's neighbours one span away, so a
sequence-sharded row moves a span's halo per level, never a row of slots.

`level0_visible` and `coarse_visible` state who sees whom; the kernel builds
its tile masks and the decode rule its slot masks from them.
"""
from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from longjax.attention import _blocks, _core, _hierarchy, implementations, spec
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


def _coarse_part(ql, kl, vl, layout, level: int, *, causal: bool, bias_fn) -> _core.Part:
  """Level l's coarse queries against their LEFT (and RIGHT) blocks of coarse keys."""
  b = layout.block
  f = 2 ** level
  batch, hk, g, size, d = ql.shape
  chunks = layout.chunks(level)
  qb = jnp.swapaxes(ql.reshape(batch, hk, g, chunks, b, d), 2, 3)  # [B, hk, K, g, b, d]
  window = lambda x, axis: layout.window(x, level, axis, causal=causal)
  kw, vw = window(kl, 2), window(vl, 2)  # [B, hk, K, W, d]
  count = window(jnp.broadcast_to(layout.count(level), (batch, size)), 1)  # [B, K, W]
  width = b if causal else 2 * b

  # Static geometry of a tile: query r of block C is coarse index C b + r (minus
  # the segment's offset); key t < b of the window is (C - 1) b + t (LEFT),
  # key t >= b is (C + 1) b + t - b (RIGHT).
  r = np.arange(b)[:, None]
  t = np.arange(width)[None, :]
  key = np.where(t < b, t, t - b + 2 * b)  # coarse index relative to block C - 1
  mask = coarse_visible(r + b, key, b, causal=causal)  # [b, W]
  rel = (r + b - key) * f  # (p - c) * f
  ok = _hierarchy.window_ok(layout, level, causal=causal)  # [B or 1, K, W]
  mask = jnp.asarray(mask)[None, None] & ok[:, :, None, :]  # [B, K, b, W]
  bias = None
  if bias_fn is not None:
    bias = _core.bias_tile(bias_fn, rel, hk)[None, :, None]
  log_count = jnp.log(jnp.maximum(count, 1.0))
  return _blocks.attend_blocks(qb, kw, vw, mask=mask[:, None, :, None], bias=bias,
                             log_weight=log_count[:, None, :, None, None, :])


def _coarse_levels(qh, kh, vh, layout, *, causal: bool, bias_fn):
  """All coarse levels' statistics, combined and interpolated to the tokens."""
  k_sum, v_sum = kh.astype(jnp.float32), vh.astype(jnp.float32)
  q_x = qh if causal else qh.astype(jnp.float32)
  parts = []
  for level in range(1, layout.levels + 1):
    k_sum = layout.coarsen(k_sum, level, 2)
    v_sum = layout.coarsen(v_sum, level, 2)
    # Causally the query of the group's first position, else the group mean.
    q_x = layout.coarsen(q_x, level, 3, first_only=causal)
    size = layout.size(level)
    safe = jnp.maximum(jnp.broadcast_to(layout.count(level), (kh.shape[0], size)), 1.0)
    k_l = (k_sum / safe[:, None, :, None]).astype(kh.dtype)
    v_l = (v_sum / safe[:, None, :, None]).astype(vh.dtype)
    q_l = q_x if causal else (q_x / safe[:, None, None, :, None]).astype(qh.dtype)
    parts.append(_coarse_part(q_l, k_l, v_l, layout, level, causal=causal, bias_fn=bias_fn))
  # Top-down: each level's statistics join the finer level's, slot by slot.
  acc = parts[-1]
  for level in range(layout.levels, 1, -1):
    acc = _core.combine(parts[level - 2], layout.interpolate(acc, level))
  return layout.interpolate(acc, 1)


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
  part = _blocks.attend_blocks(qb, kw, vw, mask=mask[:, None, :, None], bias=bias)
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

  layout = _hierarchy.layout(segment_ids, length, b, count)
  if segment_ids is None:
    parts = [window_part(qh, kh, vh, block=b, before=1, after=0 if causal else 1, radius=None,
                         causal=causal, bias_fn=bias_fn)]
  else:
    parts = [_level0_segments(qh, kh, vh, block=b, causal=causal, segment_ids=segment_ids,
                              start=layout.start, bias_fn=bias_fn)]
  if count:
    parts.append(_coarse_levels(qh, kh, vh, layout, causal=causal, bias_fn=bias_fn))
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


def keys_per_query(settings, length: int, causal: bool) -> int:
  """Level 0's keys of the budget query i and, at every level l >= 1, the coarse
  keys its level-l coarse query i // 2^l scores (each one slot). The same key
  sets as `multiresolution`'s; H-Transformer-1D's FLOPs are lower, as a coarse
  query and its scores are shared by its 2^l tokens."""
  b, query = settings['level0_block'], spec.budget_query(length, causal)
  keys = int(level0_visible(query, np.arange(length), b, causal=causal).sum())
  for level in range(1, num_levels(length, b) + 1):
    groups = np.arange(-(-length // 2 ** level))
    keys += int(coarse_visible(query // 2 ** level, groups, b, causal=causal).sum())
  return keys


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
    tile=lambda settings: settings['level0_block'],
    keys_per_query=keys_per_query, budget_param='level0_block')
