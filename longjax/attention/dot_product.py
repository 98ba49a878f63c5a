"""Full softmax attention: the reference every other kind is measured against.

O(q_len * kv_len) time and memory. Also the cross-attention of the
encoder-decoder (query and key lengths differ).

Sequence-sharded self-attention (mesh.sequence >= RING_FROM_SHARDS, no
position bias, implementation 'auto') runs as ring attention
(longjax.attention.ring): the same bytes as GSPMD's all-gather of K and V in
the forward pass, but no device holds more than two shards' keys, and the
steps overlap with compute. implementation='xla' keeps GSPMD's all-gather.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from longjax import sharding
from longjax.attention import _blocks, _core, band, implementations, ring, spec
from longjax.attention.local import window_group

# From this many sequence shards on, 'auto' passes keys around a ring instead of
# letting GSPMD gather them: the all-gathered K and V grow to the whole sequence
# on every device, the ring's stay at two shards.
RING_FROM_SHARDS = 4


def dot_product(q, k, v, *, causal: bool = False, segment_ids=None,
                kv_segment_ids=None, bias_fn: Optional[_core.BiasFn] = None,
                scale: Optional[float] = None, implementation: str = 'auto'):
  """softmax(q k^T * scale + bias + mask) v over all keys.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    causal: query i sees key j iff j <= i + (kv_len - q_len) (the queries are
      the last q_len positions of the key sequence, as when decoding).
    segment_ids: [batch, q_len] ints; query i sees key j only if their
      segment ids are equal. Padding is a segment of its own.
    kv_segment_ids: [batch, kv_len]; defaults to segment_ids when the lengths match.
    bias_fn: f(query_pos - key_pos) -> [..., heads] additive bias.
    scale: default 1/sqrt(head_dim).
    implementation: 'auto', 'xla', 'cudnn', 'splash' (self-attention) or
      'pallas_gpu'; see longjax.attention.implementations.
  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  name = 'dot_product'
  batch, q_len, kv_len, _, kv_heads, dim = _core.check_qkv(q, k, v, name)
  segment_ids = _core.check_segment_ids(segment_ids, batch, q_len, name)
  self_attention = q_len == kv_len and kv_segment_ids is None
  if kv_segment_ids is None and segment_ids is not None:
    if kv_len != q_len:
      raise ValueError(f'{name}: cross-attention with segment_ids also needs '
                       f'kv_segment_ids [batch, {kv_len}].')
    kv_segment_ids = segment_ids
  kv_segment_ids = _core.check_segment_ids(kv_segment_ids, batch, kv_len, name,
                                           'kv_segment_ids')
  if (kv_segment_ids is None) != (segment_ids is None):
    raise ValueError(f'{name}: give both segment_ids and kv_segment_ids, or neither.')
  found = implementations.problems(
      q, segment_ids=segment_ids, bias_fn=bias_fn, self_attention=self_attention,
      extra={'cudnn': 'causal cross-attention with different lengths'
             if causal and q_len != kv_len else ''})
  choice = implementations.choose(implementation, name, supported=SPEC.implementations,
                                  problems_found=found)
  if choice.name == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        implementation='cudnn')
  qh = _core.scaled_queries(q, kv_heads, dim, scale)
  if choice.name != 'xla':
    kh, vh = _core.heads_major(k), _core.heads_major(v)
    if self_attention:
      return band.output(choice, qh, kh, vh, left=None, right=0 if causal else None,
                         causal=causal, segment_ids=segment_ids, dtype=q.dtype)
    return band.cross_output(choice, qh, kh, vh, causal=causal, segment_ids=segment_ids,
                             kv_segment_ids=kv_segment_ids, dtype=q.dtype)

  if (implementation == 'auto' and self_attention and bias_fn is None
      and sharding.mesh_axis_size('sequence') >= RING_FROM_SHARDS
      and q_len % sharding.mesh_axis_size('sequence') == 0):
    return ring.ring_attention(qh, _core.heads_major(k), _core.heads_major(v), causal=causal,
                               segment_ids=segment_ids).astype(q.dtype)

  qh = qh[:, :, None]  # [b, hk, 1, g, lq, d]
  kh, vh = (_core.heads_major(x)[:, :, None] for x in (k, v))      # [b, hk, 1, lk, d]
  # In-graph iotas, not a numpy [q_len, kv_len] constant: at 64k that constant
  # alone was 32 GiB at trace time.
  rel = (jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0) + (kv_len - q_len)
         - jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1))
  mask = rel >= 0 if causal else jnp.ones((1, 1), bool)
  if segment_ids is not None:
    same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & same[:, None, None, None]
  bias = None
  if bias_fn is not None:
    bias = _core.bias_tile(bias_fn, rel, kv_heads)[None, :, None]
  part = _blocks.attend_blocks(qh, kh, vh, mask=mask, bias=bias)
  return _core.merge([part], q.dtype)


# Decoding: every earlier position stays in the cache (pinned slots).
def keys_per_query(settings, length: int, causal: bool) -> int:
  """Every key of the row (the last query's, when causal)."""
  del settings, causal  # The budget query sees the whole row either way.
  return int(length)


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  del settings
  return spec.CacheLayout(pinned=max_length, ring=0)


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  del settings, pooled
  return [window_group(window, t, lambda query, key: key <= query)]


SPEC = spec.KindSpec('full', dot_product, (), 'O(L^2)', 'Vaswani et al. 2017',
                     cache_layout=cache_layout, decode_keys=decode_keys,
                     implementations=('xla', 'cudnn', 'splash', 'pallas_gpu'),
                     keys_per_query=keys_per_query)
