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


def _coarse_level(qg, k, v, *, level, block, causal, segment_ids, bias_fn):
  """The part of level `level` >= 1 over pure coarse keys."""
  b, length, hk, g, d = qg.shape
  f = 2 ** level          # tokens per coarse key
  w = block * f           # queries per level block
  n = -(-length // w)     # level blocks
  before, after = 1, (0 if causal else 1)
  width = (before + 1 + after) * block
  pooled = _pooling.pool_groups(k, v, group_size=f, num_groups=n * block,
                                length=length, segment_ids=segment_ids)
  qb = _core.pad_axis(qg, 1, n * w).reshape(b, n, w, hk, g, d)
  to_window = lambda x: _core.neighbor_blocks(
      x.reshape((b, n, block) + x.shape[2:]), before=before, after=after)
  kw, vw = to_window(pooled.k), to_window(pooled.v)

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
  mask = mask[None] & ((c >= 0) & (c < n * block))[:, None, :]
  mask = jnp.asarray(mask)[None] & to_window(pooled.pure)[:, :, None, :]
  if segment_ids is not None:
    seg_q = _core.pad_axis(segment_ids, 1, n * w).reshape(b, n, w)
    mask = mask & (seg_q[:, :, :, None] == to_window(pooled.segment)[:, :, None, :])
  bias = None
  if bias_fn is not None:
    rel = r - tc * f - f // 2  # query_pos - middle of the coarse group
    bias = jnp.moveaxis(_core.bias_heads(bias_fn, rel, hk), (0, 1), (2, 3))
  log_count = jnp.log(jnp.maximum(to_window(pooled.count), 1.0))
  part = _core.attend_blocks(qb, kw, vw, mask=mask[:, :, None, None], bias=bias,
                             log_weight=log_count)
  return _core.slice_part(part, length)


def _boundary_level(qg, k, v, *, level, block, causal, segment_ids, bias_fn):
  """The part of level `level` over each query's segment-boundary groups."""
  length = qg.shape[1]
  hk = k.shape[2]
  f = 2 ** level
  w = block * f
  edge = _pooling.boundary_keys(k, v, group_size=f, segment_ids=segment_ids)
  i = jnp.arange(length)[None, :, None]
  c = edge.group
  level_block = i // w
  lo = (level_block - 1) * block
  hi = (level_block + (1 if causal else 2)) * block
  finer_block = i // (w // 2)
  finer = ((finer_block - 1) * block // 2 <= c) & (c < (finer_block + 2) * block // 2)
  mask = edge.exists & (lo <= c) & (c < hi) & ~finer
  if causal:
    mask &= c * f + f - 1 <= i
  bias = None
  if bias_fn is not None:
    bias = _core.bias_heads(bias_fn, i - c * f - f // 2, hk)
  return _core.attend_per_query(qg, edge.k, edge.v, mask=mask, bias=bias,
                                log_weight=jnp.log(jnp.maximum(edge.count, 1.0)))


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
  scale = _core.default_scale(dim, scale)
  qg = _core.group_queries(q * jnp.asarray(scale, q.dtype), kv_heads)

  parts = [window_part(qg, k, v, block=block_size, before=1, after=0 if causal else 1,
                       radius=None, causal=causal, segment_ids=segment_ids,
                       bias_fn=bias_fn)]
  for level in range(1, num_levels(length, block_size) + 1):
    kwargs = dict(level=level, block=block_size, causal=causal,
                  segment_ids=segment_ids, bias_fn=bias_fn)
    parts.append(_coarse_level(qg, k, v, **kwargs))
    if segment_ids is not None:
      parts.append(_boundary_level(qg, k, v, **kwargs))
  return _core.merge(parts, q.dtype)
