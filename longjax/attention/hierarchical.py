"""Hierarchical attention in the style of H-Transformer-1D (Zhu & Soricut, 2021).

The attention matrix is approximated by a hierarchical (H-) matrix: exact near
the diagonal, coarser the farther a key is from the query.

Exactly, with b = block_size (even) and w_l = b * 2^l:
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
  * segment_ids: a coarse key is the mean over the group's tokens in the
    query's own segment (see _pooling.py for how groups that straddle a
    boundary are handled).

Cost: O(length * block_size * log(length / block_size)). With block_size >=
length (or length <= 2 * block_size) it is exactly full attention.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from longjax.attention import _core, _pooling
from longjax.attention.local import window_part


def num_levels(length: int, block_size: int) -> int:
  """Number of coarse levels above level 0: the smallest l with 2 * w_l >= length."""
  levels = 0
  while 2 * block_size * 2 ** levels < length:
    levels += 1
  return levels


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
  # coarse keys after the block's start.
  r = np.arange(w)[:, None]
  tc = np.arange(width)[None, :] - before * block
  half = r // (w // 2)  # which level-(l-1) block the query is in (0 or 1)
  finer = ((half - 1) * block // 2 <= tc) & (tc < (half + 2) * block // 2)
  mask = ~finer
  if causal:
    mask &= tc * f + f - 1 <= r
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
  part = _core.attend_blocks(qb, kw, vw, mask=mask[:, None, :, None], bias=bias,
                             log_weight=log_count[:, None, :, None, None, :])
  return _core.slice_part(part, length)


def _boundary_level(qh, kh, vh, *, level, block, causal, segment_ids, bias_fn):
  """The part of level `level` over each query's segment-boundary groups."""
  hk, length = kh.shape[1], kh.shape[2]
  f = 2 ** level
  w = block * f
  edge = _pooling.boundary_keys(kh, vh, group_size=f, segment_ids=segment_ids)
  i = jnp.arange(length)[None, :, None]
  c = edge.group  # [b, l, 2]
  level_block = i // w
  lo = (level_block - 1) * block
  hi = (level_block + (1 if causal else 2)) * block
  finer_block = i // (w // 2)
  finer = ((finer_block - 1) * block // 2 <= c) & (c < (finer_block + 2) * block // 2)
  mask = edge.exists & (lo <= c) & (c < hi) & ~finer
  if causal:
    mask &= c * f + f - 1 <= i
  bias = None
  if bias_fn is not None:  # [b, l, 2, hk, g] -> [b, hk, g, l, 2]
    bias = jnp.moveaxis(_core.bias_heads(bias_fn, i - c * f - f // 2, hk), (3, 4), (1, 2))
  log_count = jnp.log(jnp.maximum(edge.count, 1.0))[:, None, None]
  return _core.attend_per_query(qh, edge.k, edge.v, mask=mask[:, None, None], bias=bias,
                                log_weight=log_count)


def hierarchical(q, k, v, *, block_size: int, causal: bool = False, segment_ids=None,
                 bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None):
  """H-Transformer-1D attention: exact near the diagonal, pooled keys farther out.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    block_size: even block length b of level 0; level l pools 2^l tokens.
    causal, segment_ids, bias_fn, scale: as in `local`; the bias of a coarse
      key uses its group's middle position.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'hierarchical'
  batch, length, kv_len, _, kv_heads, dim = _core.check_qkv(q, k, v, name)
  if kv_len != length:
    raise ValueError(f'{name}: is self-attention; q and k lengths differ ({length} vs {kv_len}).')
  block_size = _core.check_positive_int(block_size, name, 'block_size', minimum=2)
  if block_size % 2:
    raise ValueError(f'{name}: block_size must be even (levels halve it); got {block_size}.')
  segment_ids = _core.check_segment_ids(segment_ids, batch, length, name)
  qh = _core.scaled_queries(q, kv_heads, dim, scale)
  kh, vh = _core.heads_major(k), _core.heads_major(v)

  parts = [window_part(qh, kh, vh, block=block_size, before=1, after=0 if causal else 1,
                       radius=None, causal=causal, segment_ids=segment_ids,
                       bias_fn=bias_fn)]
  for level in range(1, num_levels(length, block_size) + 1):
    kwargs = dict(level=level, block=block_size, causal=causal,
                  segment_ids=segment_ids, bias_fn=bias_fn)
    parts.append(_coarse_level(qh, kh, vh, **kwargs))
    if segment_ids is not None:
      parts.append(_boundary_level(qh, kh, vh, **kwargs))
  return _core.merge(parts, q.dtype)
