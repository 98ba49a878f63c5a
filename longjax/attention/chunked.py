"""Chunked attention: the "split, attend, concatenate" baseline.

The sequence is cut into independent chunks of `block_size` tokens and every
chunk attends only to itself (causally when asked). It is what one gets by
running a short-context model over a long input piece by piece, and the
baseline every long-range method should beat. O(length * block_size).
"""
from __future__ import annotations

from typing import Optional

from longjax.attention import _core
from longjax.attention.local import window_part


def chunked(q, k, v, *, block_size: int, causal: bool = False, segment_ids=None,
            bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None):
  """Attention within independent chunks: i sees j iff i // block_size == j // block_size.

  Args as `local`, with `block_size` the chunk length (the last chunk may be shorter).
  """
  name = 'chunked'
  batch, length, kv_len, _, kv_heads, dim = _core.check_qkv(q, k, v, name)
  if kv_len != length:
    raise ValueError(f'{name}: is self-attention; q and k lengths differ ({length} vs {kv_len}).')
  block_size = _core.check_positive_int(block_size, name, 'block_size')
  segment_ids = _core.check_segment_ids(segment_ids, batch, length, name)
  part = window_part(_core.scaled_queries(q, kv_heads, dim, scale), _core.heads_major(k),
                     _core.heads_major(v), block=block_size, before=0, after=0, radius=None,
                     causal=causal, segment_ids=segment_ids, bias_fn=bias_fn)
  return _core.merge([part], q.dtype)
