"""Transient-global attention (LongT5's TGlobal, Guo et al. 2022).

Every query attends its local window (|i - j| <= radius) plus one *summary*
key/value per block of `summary_block` tokens, all in one softmax.

Summaries, exactly: the summary of block c is the mean of the keys and the
mean of the values of tokens [c * summary_block, (c + 1) * summary_block) ∩
[0, length) — of those in the query's own segment when segment_ids are given.
A summary is one key, not weighted by the block size.

Not yet LongT5's TGlobal (Guo et al. 2022), which sums the block's layer
inputs, applies a learned RMS norm, then the layer's k/v projections, and
biases summaries with a separate table on block distance: here the pooled
keys carry RoPE and no norm, the summary bias is the token bias at the block's
middle, and a trailing partial block is its own summary (LongT5 merges it into
the previous one). The kernel takes no external summaries yet.

Causal form: a query at position i sees the summary of block c only if the
block ends before it, (c + 1) * summary_block <= i, so no later token leaks
through a summary.

Cost: O(length * (radius + length / summary_block)) — linear in the window, with
a length^2 / summary_block term for the summaries, as in LongT5.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from longjax.attention import _core, _pooling, spec
from longjax.attention.local import (default_block, ring_length, window_group, window_part,
                                     window_visible)


def summary_position(block, summary_block: int):
  """Position of a summary for position biases: its block's middle token."""
  return block * summary_block + summary_block // 2


def summary_visible(query_pos, block, summary_block: int):
  """Causal form: whether a query may see the summary of `block` (numpy or jax ints).

  Only blocks that end at or before the query, (block + 1) * summary_block <=
  query_pos, so no later token leaks through a summary. (Bidirectional
  queries see every summary.)
  """
  return (block + 1) * summary_block <= query_pos


def transient_global(q, k, v, *, radius: int, summary_block: int, causal: bool = False,
                     segment_ids=None, bias_fn: Optional[_core.BiasFn] = None,
                     scale: Optional[float] = None, implementation: str = 'auto'):
  """Local window of `radius` plus one mean-pooled summary per block of `summary_block`.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    radius: local window radius (>= 1).
    summary_block: tokens per summary block (>= 1).
    causal, segment_ids, bias_fn, scale, implementation: as in `local`; the bias of a summary
      uses its block's middle position.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'transient_global'
  qh, kh, vh, segment_ids, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  batch, length, kv_heads = dims.batch, dims.length, dims.kv_heads
  radius = _core.check_positive_int(radius, name, 'radius')
  summary_block = _core.check_positive_int(summary_block, name, 'summary_block')
  _core.resolve_implementation(implementation, name, supported=SPEC.implementations)

  window = window_part(qh, kh, vh, block=default_block(radius), before=1,
                       after=0 if causal else 1, radius=radius, causal=causal,
                       segment_ids=segment_ids, bias_fn=bias_fn)

  num_blocks = -(-length // summary_block)
  pooled = _pooling.pool_groups(kh, vh, group_size=summary_block, num_groups=num_blocks,
                                length=length, segment_ids=segment_ids)
  positions = jnp.arange(length)
  blocks = jnp.arange(num_blocks)
  mask = jnp.broadcast_to(pooled.pure[:, None, :], (batch, length, num_blocks))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == pooled.segment[:, None, :])
  if causal:
    mask = mask & summary_visible(positions[:, None], blocks[None, :], summary_block)[None]
  bias = None
  if bias_fn is not None:
    rel = positions[:, None] - summary_position(blocks[None, :], summary_block)
    bias = _core.bias_tile(bias_fn, rel, kv_heads)[None, :, None]
  summaries = _core.attend_blocks(qh[:, :, None], pooled.k[:, :, None], pooled.v[:, :, None],
                                  mask=mask[:, None, None, None], bias=bias)
  parts = [window, summaries]

  if segment_ids is not None:
    edge = _pooling.boundary_keys(kh, vh, group_size=summary_block, segment_ids=segment_ids)
    mask = edge.exists
    if causal:
      mask = mask & summary_visible(positions[None, :, None], edge.group, summary_block)
    bias = None
    if bias_fn is not None:  # [b, l, 2, hk, g] -> [b, hk, g, l, 2]
      rel = positions[None, :, None] - summary_position(edge.group, summary_block)
      bias = jnp.moveaxis(_core.bias_heads(bias_fn, rel, kv_heads), (3, 4), (1, 2))
    parts.append(_core.attend_per_query(qh, edge.k, edge.v, mask=mask[:, None, None],
                                        bias=bias))
  return _core.merge(parts, q.dtype)


# Decoding: a ring of the last radius + 1 positions, and one summary per block,
# completed when the block's last token arrives.
def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  size = settings['summary_block']
  return spec.CacheLayout(pinned=0, ring=ring_length(settings['radius'] + 1, max_length),
                          pool_sizes=(size,), pool_slots=(-(-max_length // size),))


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  radius, size = settings['radius'], settings['summary_block']
  (summaries,) = pooled
  block = summaries.held
  mask = (block >= 0) & summary_visible(t[:, None], block, size)
  return [window_group(window, t, lambda query, key: window_visible(
              query - key, radius=radius, causal=True)),
          spec.KeyGroup(summaries.k, summaries.v, mask,
                        rel=t[:, None] - summary_position(block, size))]


SPEC = spec.KindSpec(
    'transient_global', transient_global, ('radius', 'summary_block'), 'O(L (r + L/k))',
    'LongT5 TGlobal (Guo et al. 2022)', cache_layout=cache_layout, decode_keys=decode_keys)
