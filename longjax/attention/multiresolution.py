"""Multiresolution attention: every token's own query against coarse keys.

A longjax variant, NOT H-Transformer-1D (Zhu & Soricut 2021; that is
`hierarchical`). It uses the same nested regions as H-Transformer-1D, but
each token scores the coarse keys with its *own* exact query, instead of a
coarse query shared by its group whose coarse output is interpolated back to
the tokens. It is therefore more accurate than H-Transformer-1D (the only
approximation is on the key/value side), and costs O(L b log(L/b)) instead
of the paper's O(L b): every token attends about 2b coarse keys per level.
No hierarchical relative position bias (a coarse key's bias is `bias_fn` at
the query minus its group's middle position).

The attention matrix is approximated by a hierarchical (H-) matrix: exact near
the diagonal, coarser the farther a key is from the query.

Exactly, with b = level0_block (even) and w_l = b * 2^l:
  * level 0: a query i in block N_0 = i // b attends exactly to every key of
    blocks N_0 - 1, N_0, N_0 + 1 (region R_0(i) = [(N_0 - 1) b, (N_0 + 2) b)).
  * level l >= 1: keys and values are averaged over groups of 2^l consecutive
    tokens ("coarse keys"). With N_l = i // w_l, the query attends the coarse
    keys of region R_l(i) = [(N_l - 1) w_l, (N_l + 2) w_l) that are not in
    R_{l-1}(i) (the regions are nested, so every key is used at exactly one
    level: the finest that reaches it).
  * levels go up until R_l covers the whole input (2 w_l >= length).
  * a coarse key standing for m tokens enters the softmax with weight m
    (log m added to its score): it is exactly what full attention gives if all
    m keys were equal to their mean. All levels share one softmax.
  * causal: only keys j <= i at level 0, and only coarse groups that end at or
    before i at coarser levels — a query never sees a later token through a
    coarse key.
  * segment_ids: groups and blocks stay aligned to the row (not to each
    segment); a coarse key is the mean over the group's tokens in the query's
    own segment (see _pooling.py for how groups that straddle a boundary are
    handled).

Cost: O(length * b * log(length / b)). With b >= length (or length <= 2 * b)
it is exactly full attention.

`level0_visible` and `coarse_visible` state who sees whom; the blocked kernel
builds its tile masks and the decode rule its slot masks from them.
"""
from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from longjax.attention import _blocks, _core, implementations, _pooling, spec
from longjax.attention.hierarchical import level0_visible, levels_cache_layout, num_levels
from longjax.attention.local import window_group, window_part


def coarse_visible(query_pos, group, *, level: int, level0_block: int, causal: bool):
  """Level l >= 1: whether a query sees the coarse key of `group` (tokens
  [group * 2^l, (group + 1) * 2^l)), numpy or jax ints.

  The group must lie in R_l(i) = [(N_l - 1) w_l, (N_l + 2) w_l) (causal:
  up to (N_l + 1) w_l) and not in R_{l-1}(i), where the finer level covers it;
  causally it must also end at or before the query.
  """
  b, f = level0_block, 2 ** level
  w = b * f
  level_block = query_pos // w
  in_region = ((level_block - 1) * b <= group) & (group < (level_block + (1 if causal else 2)) * b)
  finer_block = query_pos // (w // 2)
  finer = ((finer_block - 1) * b // 2 <= group) & (group < (finer_block + 2) * b // 2)
  visible = in_region & ~finer
  if causal:
    visible = visible & (group * f + f - 1 <= query_pos)
  return visible


def _coarse_level(qh, kh, vh, *, level, block, causal, segment_ids, bias_fn):
  """The part of level `level` >= 1 over pure coarse keys (heads-major inputs)."""
  b, hk, g, length, d = qh.shape
  f = 2 ** level          # tokens per coarse key
  w = block * f           # queries per level block
  n = -(-length // w)     # level blocks
  before, after = 1, (0 if causal else 1)
  width = (before + 1 + after) * block
  pooled = _pooling.pool_groups(kh, vh, group_size=f, num_groups=n * block,
                                length=length, segment_ids=segment_ids)
  qb = jnp.swapaxes(_core.pad_axis(qh, 3, n * w).reshape(b, hk, g, n, w, d), 2, 3)
  to_window = lambda x, axis: _core.neighbor_blocks(
      x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:]), before=before,
      after=after, axis=axis)
  kw, vw = to_window(pooled.k, 2), to_window(pooled.v, 2)  # [b, hk, n, width, d]

  # Static geometry of a tile: query r of level block N is at N*w + r; coarse
  # key t of its window is c = (N - before)*block + t, i.e. tc = t - before*block
  # coarse keys after the block's start. The rule is the same for every N
  # (shifting the query by w shifts its groups by block), so take N = 0.
  r = np.arange(w)[:, None]
  tc = np.arange(width)[None, :] - before * block
  mask = coarse_visible(r, tc, level=level, level0_block=block, causal=causal)
  c = (np.arange(n)[:, None] - before) * block + np.arange(width)[None, :]
  mask = mask[None] & ((c >= 0) & (c < n * block))[:, None, :]  # [n, w, width]
  mask = jnp.asarray(mask)[None] & to_window(pooled.pure, 1)[:, :, None, :]  # [b, n, w, width]
  if segment_ids is not None:
    seg_q = _core.pad_axis(segment_ids, 1, n * w).reshape(b, n, w)
    mask = mask & (seg_q[:, :, :, None] == to_window(pooled.segment, 1)[:, :, None, :])
  bias = None
  if bias_fn is not None:
    rel = r - tc * f - f // 2  # query_pos - middle of the coarse group
    bias = _core.bias_tile(bias_fn, rel, hk)[None, :, None]
  log_count = jnp.log(jnp.maximum(to_window(pooled.count, 1), 1.0))  # [b, n, width]
  part = _blocks.attend_blocks(qb, kw, vw, mask=mask[:, None, :, None], bias=bias,
                             log_weight=log_count[:, None, :, None, None, :])
  return _core.slice_part(part, length)


def _boundary_level(qh, kh, vh, *, level, block, causal, segment_ids, bias_fn):
  """The part of level `level` over each query's segment-boundary groups."""
  hk, length = kh.shape[1], kh.shape[2]
  f = 2 ** level
  edge = _pooling.boundary_keys(kh, vh, group_size=f, segment_ids=segment_ids)
  i = jnp.arange(length)[None, :, None]
  c = edge.group  # [b, l, 2]
  mask = edge.exists & coarse_visible(i, c, level=level, level0_block=block, causal=causal)
  bias = None
  if bias_fn is not None:  # [b, l, 2, hk, g] -> [b, hk, g, l, 2]
    bias = jnp.moveaxis(_core.bias_heads(bias_fn, i - c * f - f // 2, hk), (3, 4), (1, 2))
  log_count = jnp.log(jnp.maximum(edge.count, 1.0))[:, None, None]
  return _core.attend_per_query(qh, edge.k, edge.v, mask=mask[:, None, None], bias=bias,
                                log_weight=log_count)


def multiresolution(q, k, v, *, level0_block: int, causal: bool = False, segment_ids=None,
                 bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None,
                 implementation: str = 'auto'):
  """Multiresolution attention: exact near the diagonal, each token's own query
  against pooled keys farther out (see the module docstring).

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    level0_block: even block length b of level 0; level l pools 2^l tokens.
    causal, segment_ids, bias_fn, scale, implementation: as in `local`; the
      bias of a coarse key uses its group's middle position.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'multiresolution'
  qh, kh, vh, segment_ids, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  level0_block = _core.check_positive_int(level0_block, name, 'level0_block', minimum=2)
  if level0_block % 2:
    raise ValueError(f'{name}: level0_block must be even (levels halve it); got {level0_block}.')
  implementations.choose(implementation, name, supported=SPEC.implementations)

  parts = [window_part(qh, kh, vh, block=level0_block, before=1, after=0 if causal else 1,
                       radius=None, causal=causal, segment_ids=segment_ids,
                       bias_fn=bias_fn)]
  for level in range(1, num_levels(dims.length, level0_block) + 1):
    kwargs = dict(level=level, block=level0_block, causal=causal,
                  segment_ids=segment_ids, bias_fn=bias_fn)
    parts.append(_coarse_level(qh, kh, vh, **kwargs))
    if segment_ids is not None:
      parts.append(_boundary_level(qh, kh, vh, **kwargs))
  return _core.merge(parts, q.dtype)


# Decoding: level 0 keeps the last 2b positions (blocks N_0 - 1 and N_0); each
# coarse level a ring of at most 2b group means (its region before the query).
def keys_per_query(settings, length: int, causal: bool) -> int:
  """Level 0's keys of the budget query and its coarse keys at every level
  (each one slot): about 3b + 1.5b per level bidirectionally."""
  b, query = settings['level0_block'], spec.budget_query(length, causal)
  keys = int(level0_visible(query, np.arange(length), b, causal=causal).sum())
  for level in range(1, num_levels(length, b) + 1):
    groups = np.arange(-(-length // 2 ** level))
    keys += int(coarse_visible(query, groups, level=level, level0_block=b, causal=causal).sum())
  return keys


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return levels_cache_layout(settings['level0_block'], max_length, pool_queries=False)


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  b = settings['level0_block']
  groups = [window_group(window, t, lambda query, key: level0_visible(query, key, b,
                                                                      causal=True))]
  for level, buffer in enumerate(pooled, start=1):
    f = 2 ** level
    c = buffer.held
    mask = (c >= 0) & coarse_visible(t[:, None], c, level=level, level0_block=b, causal=True)
    groups.append(spec.KeyGroup(buffer.k, buffer.v, mask, rel=t[:, None] - c * f - f // 2,
                                log_weight=jnp.full(c.shape, math.log(f), jnp.float32)))
  return groups


SPEC = spec.KindSpec(
    'multiresolution', multiresolution, ('level0_block',), 'O(L b log(L/b))',
    'longjax variant of H-Transformer-1D (Zhu & Soricut 2021) with exact per-token queries',
    cache_layout=cache_layout, decode_keys=decode_keys, segment_aligned=False,
    tile=lambda settings: settings['level0_block'],
    keys_per_query=keys_per_query, budget_param='level0_block')
