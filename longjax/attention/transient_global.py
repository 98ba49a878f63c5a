"""Transient-global attention (LongT5's TGlobal, Guo et al. 2022).

Every query attends its local window (|i - j| <= radius) plus one *summary*
key/value per block of `block_size` tokens, all in one softmax.

Summaries, exactly: the summary of block c is the mean of the keys and the
mean of the values of tokens [c * block_size, (c + 1) * block_size) ∩
[0, length) — of those in the query's own segment when segment_ids are given.
(LongT5 sums the block's token embeddings, layer-normalises and projects
them; because the projections are linear, mean-pooling the projected keys and
values is that construction without the norm, and it keeps this kernel a
function of q, k, v alone. A model that wants LongT5's exact summaries can
feed its own.) A summary is one key, not weighted by the block size.

Causal form: a query at position i sees the summary of block c only if the
block ends before it, (c + 1) * block_size <= i, so no later token leaks
through a summary.

Cost: O(length * (radius + length / block_size)) — linear in the window, with
a length^2 / block_size term for the summaries, as in LongT5.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from longjax.attention import _core, _pooling
from longjax.attention.local import default_block, window_part


def summary_position(block: int, block_size: int):
  """Position of a summary for position biases: its block's middle token."""
  return block * block_size + block_size // 2


def transient_global(q, k, v, *, radius: int, block_size: int, causal: bool = False,
                     segment_ids=None, bias_fn: Optional[_core.BiasFn] = None,
                     scale: Optional[float] = None):
  """Local window of `radius` plus one mean-pooled summary per block of `block_size`.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    radius: local window radius (>= 1).
    block_size: tokens per summary block (>= 1).
    causal, segment_ids, bias_fn, scale: as in `local`; the bias of a summary
      uses its block's middle position.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'transient_global'
  batch, length, kv_len, _, kv_heads, dim = _core.check_qkv(q, k, v, name)
  if kv_len != length:
    raise ValueError(f'{name}: is self-attention; q and k lengths differ ({length} vs {kv_len}).')
  radius = _core.check_positive_int(radius, name, 'radius')
  block_size = _core.check_positive_int(block_size, name, 'block_size')
  segment_ids = _core.check_segment_ids(segment_ids, batch, length, name)
  qh = _core.scaled_queries(q, kv_heads, dim, scale)  # [b, hk, g, l, d]
  kh, vh = _core.heads_major(k), _core.heads_major(v)  # [b, hk, l, d]

  window = window_part(qh, kh, vh, block=default_block(radius), before=1,
                       after=0 if causal else 1, radius=radius, causal=causal,
                       segment_ids=segment_ids, bias_fn=bias_fn)

  num_blocks = -(-length // block_size)
  pooled = _pooling.pool_groups(kh, vh, group_size=block_size, num_groups=num_blocks,
                                length=length, segment_ids=segment_ids)
  positions = jnp.arange(length)
  blocks = jnp.arange(num_blocks)
  mask = jnp.broadcast_to(pooled.pure[:, None, :], (batch, length, num_blocks))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == pooled.segment[:, None, :])
  if causal:
    mask = mask & ((blocks[None, :] + 1) * block_size <= positions[:, None])[None]
  bias = None
  if bias_fn is not None:
    rel = positions[:, None] - summary_position(blocks[None, :], block_size)
    bias = _core.bias_tile(bias_fn, rel, kv_heads)[None, :, None]
  summaries = _core.attend_blocks(qh[:, :, None], pooled.k[:, :, None], pooled.v[:, :, None],
                                  mask=mask[:, None, None, None], bias=bias)
  parts = [window, summaries]

  if segment_ids is not None:
    edge = _pooling.boundary_keys(kh, vh, group_size=block_size, segment_ids=segment_ids)
    mask = edge.exists
    if causal:
      mask = mask & ((edge.group + 1) * block_size <= positions[None, :, None])
    bias = None
    if bias_fn is not None:  # [b, l, 2, hk, g] -> [b, hk, g, l, 2]
      rel = positions[None, :, None] - summary_position(edge.group, block_size)
      bias = jnp.moveaxis(_core.bias_heads(bias_fn, rel, kv_heads), (3, 4), (1, 2))
    parts.append(_core.attend_per_query(qh, edge.k, edge.v, mask=mask[:, None, None],
                                        bias=bias))
  return _core.merge(parts, q.dtype)
