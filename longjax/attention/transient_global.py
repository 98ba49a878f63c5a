"""Transient-global attention: LongT5's TGlobal (Guo et al. 2022, §3.1.2).

Every query attends its local window (|i - j| <= radius) plus one *summary*
key/value per block of `summary_block` tokens, all in one softmax.

Summaries, as LongT5 (HF `modeling_flax_longt5.py`, flaxformer
`long_attention.py`): the summary of block c is formed from the layer's
(pre-normed) inputs x, not from its keys,

    s_c = RMSNorm_g(sum_{t in block c} x_t),   k_c = W_k s_c,   v_c = W_v s_c,

with the layer's own k/v projections, no rotary embedding, and a learned norm
scale g per layer (`global_input_layer_norm`). The model layer builds them
(`summary_layout` says which token goes into which summary) and passes
`summary_k`, `summary_v` to the kernel. A summary's score gets its own bias,
`summary_bias_fn(query_block - c)` (LongT5's separate
`global_relative_attention_bias` table on T5 buckets of the block distance),
not the token table.

Blocks are aligned to the document: with `segment_ids`, every segment's blocks
start at its first token and it sees only its own summaries, so a packed
document gets exactly what it gets alone (`summary_layout`).

Orphans, bidirectional (LongT5): the tokens of a segment's trailing partial
block join its last full block (`handle_orphan_tokens`), so a segment of n
tokens has n // summary_block summaries; one shorter than a block has none.

Causal form (a longjax extension; LongT5 is an encoder): a query at
segment-relative position p sees the summary of block c only if the block
ends at or before it, (c + 1) * summary_block <= p, so no later token leaks
through a summary. There are no orphans (whether a block is a segment's last
full one depends on later tokens): a partial block is in no summary.

Cost: O(length * (radius + length / summary_block)) — linear in the window, with
a length^2 / summary_block term for the summaries, as in LongT5.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax.numpy as jnp

from longjax.attention import _blocks, _core, implementations, spec
from longjax.attention.local import (default_block, ring_length, window_group, window_keys,
                                     window_part, window_visible)


def num_summaries(length: int, summary_block: int) -> int:
  """Summary slots of a row of `length` tokens: every segment has at most
  n // summary_block summaries, so a row never needs more than this (LongT5's
  global_seq_len)."""
  return length // summary_block


def summary_visible(query_pos, block, summary_block: int):
  """Causal form: whether a query may see the summary of `block` (numpy or jax ints).

  Only blocks that end at or before the query, (block + 1) * summary_block <=
  query_pos (segment-relative positions), so no later token leaks through a
  summary. (Bidirectional queries see every summary of their segment.)
  """
  return (block + 1) * summary_block <= query_pos


class SummaryLayout(NamedTuple):
  """Which summary each token goes into, and what each summary slot holds.

  token_summary: [b, l] int32, the summary slot a token is summed into, -1 none.
  query_block: [b, l] int32, the block a query counts as its own for the
    summary bias (orphans: their full block, as LongT5), -1 none.
  position: [b, l] int32, position in the token's segment.
  segment: [b, G] int32 segment of each summary slot; block: [b, G] int32 its
    block index in that segment; valid: [b, G] bool (the slot holds a summary).
  """
  token_summary: object
  query_block: object
  position: object
  segment: object
  block: object
  valid: object


def summary_layout(segment_ids, *, batch: int, length: int, summary_block: int,
                   causal: bool) -> SummaryLayout:
  """The document-aligned summary blocks of a batch (see the module doc).

  segment_ids: [batch, length] or None (one segment). Summaries of a row are
  numbered in order: segment by segment, block by block.
  """
  k = summary_block
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, length), jnp.int32)
  start, end = _core.segment_bounds(segment_ids)
  position = jnp.arange(length, dtype=jnp.int32)[None, :] - start
  full = (end - start) // k  # full blocks of the token's segment
  block = position // k
  if causal:
    member = block < full
    query_block = block
  else:  # orphans join the last full block
    block = jnp.minimum(block, full - 1)
    member = block >= 0
    query_block = jnp.where(member, block, -1)
  # Slot of block 0 of each segment: the full blocks of the segments before it.
  first = position == 0
  offset = _core.cumulative(jnp.where(first, full, 0), 'add') - full
  token_summary = jnp.where(member, offset + block, -1).astype(jnp.int32)

  slots = num_summaries(length, k)
  target = jnp.where(member, token_summary, slots)  # out of range: dropped
  scatter = lambda values, fill: _core.scatter_rows(target, values, slots, fill)

  return SummaryLayout(token_summary, query_block.astype(jnp.int32), position,
                       scatter(segment_ids, 0), scatter(block.astype(jnp.int32), -1),
                       scatter(jnp.ones((batch, length), bool), False))


def transient_global(q, k, v, *, summary_k, summary_v, radius: int, summary_block: int,
                     causal: bool = False, segment_ids=None,
                     bias_fn: Optional[_core.BiasFn] = None,
                     summary_bias_fn: Optional[_core.BiasFn] = None,
                     scale: Optional[float] = None, implementation: str = 'auto'):
  """Local window of `radius` plus the summaries of every block of `summary_block`.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    summary_k, summary_v: [batch, num_summaries(length, summary_block), kv_heads,
      head_dim], the summaries' keys and values, slot by slot as `summary_layout`
      numbers them (slots it marks invalid are ignored).
    radius: local window radius (>= 1).
    summary_block: tokens per summary block (>= 1).
    causal, segment_ids, bias_fn, scale, implementation: as in `local`.
    summary_bias_fn: f(query_block - summary_block_index) -> [..., heads], the
      summaries' own bias (None: none).
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'transient_global'
  qh, kh, vh, seg, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  batch, length, kv_heads = dims.batch, dims.length, dims.kv_heads
  radius = _core.check_positive_int(radius, name, 'radius')
  summary_block = _core.check_positive_int(summary_block, name, 'summary_block')
  implementations.choose(implementation, name, supported=SPEC.implementations)
  slots = num_summaries(length, summary_block)
  expected = (batch, slots, kv_heads, dims.head_dim)
  if summary_k.shape != expected or summary_v.shape != expected:
    raise ValueError(f'{name}: summary_k and summary_v must be [batch, length // summary_block, '
                     f'kv_heads, head_dim] = {expected}; got {summary_k.shape}, '
                     f'{summary_v.shape}.')

  window = window_part(qh, kh, vh, block=default_block(radius), before=1,
                       after=0 if causal else 1, radius=radius, causal=causal,
                       segment_ids=seg, bias_fn=bias_fn)
  if slots == 0:
    return _core.merge([window], q.dtype)

  layout = summary_layout(seg, batch=batch, length=length, summary_block=summary_block,
                          causal=causal)
  query_seg = seg if seg is not None else jnp.zeros((batch, length), jnp.int32)
  mask = layout.valid[:, None, :] & (query_seg[:, :, None] == layout.segment[:, None, :])
  mask = mask & (layout.query_block[:, :, None] >= 0)
  if causal:
    mask = mask & summary_visible(layout.position[:, :, None], layout.block[:, None, :],
                                  summary_block)
  bias = None
  if summary_bias_fn is not None:  # [b, l, G, hk, g] -> [b, hk, 1, g, l, G]
    rel = layout.query_block[:, :, None] - layout.block[:, None, :]
    bias = jnp.moveaxis(_core.bias_heads(summary_bias_fn, rel, kv_heads), (3, 4), (1, 2))
    bias = bias[:, :, None]
  summaries = _blocks.attend_blocks(qh[:, :, None], _core.heads_major(summary_k)[:, :, None],
                                  _core.heads_major(summary_v)[:, :, None],
                                  mask=mask[:, None, None, None], bias=bias)
  return _core.merge([window, summaries], q.dtype)


def keys_per_query(settings, length: int, causal: bool) -> int:
  """The window and the summaries the budget query sees: every block's (orphans
  join the last, length // k) bidirectionally; causally those of blocks ending
  at or before it, (c + 1) k <= query."""
  block = settings['summary_block']
  summaries = (spec.budget_query(length, causal) if causal else length) // block
  return int(window_keys(length, settings['radius'], causal).sum()) + summaries


# Decoding: a ring of the last radius + 1 positions, and one summary per block,
# formed by the layer from its inputs when the block's last token arrives.
def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  size = settings['summary_block']
  return spec.CacheLayout(pinned=0, ring=ring_length(settings['radius'] + 1, max_length),
                          pool_sizes=(size,), pool_slots=(max(1, max_length // size),),
                          pool_from_inputs=True)


def decode_keys(settings, window: spec.Slots, pooled, t, *, summary_bias_fn=None) -> list:
  radius, size = settings['radius'], settings['summary_block']
  (summaries,) = pooled
  block = summaries.held
  mask = (block >= 0) & summary_visible(t[:, None], block, size)
  bias = None
  if summary_bias_fn is not None:  # [b, slots, heads] -> [b, heads, slots]
    bias = jnp.moveaxis(summary_bias_fn((t // size)[:, None] - block), 2, 1)
  return [window_group(window, t, lambda query, key: window_visible(
              query - key, radius=radius, causal=True)),
          spec.KeyGroup(summaries.k, summaries.v, mask, bias=bias)]


SPEC = spec.KindSpec(
    'transient_global', transient_global, ('radius', 'summary_block'), 'O(L (r + L/k))',
    'LongT5 TGlobal (Guo et al. 2022)', cache_layout=cache_layout, decode_keys=decode_keys,
    summary_layout=summary_layout,
    tile=lambda settings: math.lcm(default_block(settings['radius']), settings['summary_block']),
    keys_per_query=keys_per_query, budget_param='radius')
