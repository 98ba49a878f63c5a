"""Chunked attention: the "split, attend, concatenate" baseline.

The sequence is cut into independent chunks of `chunk_size` tokens and every
chunk attends only to itself (causally when asked). It is what one gets by
running a short-context model over a long input piece by piece, and the
baseline every long-range method should beat. O(length * chunk_size).

The kernel is the blocked window of `local` with tiles of one chunk and no
neighbours; decoding keeps a ring of one chunk and masks it with `same_chunk`.
"""
from __future__ import annotations

from typing import Optional

from longjax.attention import _core, spec
from longjax.attention.local import ring_length, window_group, window_part


def same_chunk(query_pos, key_pos, chunk_size: int):
  """Whether a query and a key lie in the same chunk (numpy or jax ints)."""
  return query_pos // chunk_size == key_pos // chunk_size


def chunked(q, k, v, *, chunk_size: int, causal: bool = False, segment_ids=None,
            bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None,
            implementation: str = 'auto'):
  """Attention within independent chunks: i sees j iff i // chunk_size == j // chunk_size.

  Args as `local`, with `chunk_size` the chunk length (the last chunk may be shorter).
  """
  name = 'chunked'
  qh, kh, vh, segment_ids, _ = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  chunk_size = _core.check_positive_int(chunk_size, name, 'chunk_size')
  _core.resolve_implementation(implementation, name, supported=SPEC.implementations)
  part = window_part(qh, kh, vh, block=chunk_size, before=0, after=0, radius=None,
                     causal=causal, segment_ids=segment_ids, bias_fn=bias_fn)
  return _core.merge([part], q.dtype)


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return spec.CacheLayout(pinned=0, ring=ring_length(settings['chunk_size'], max_length))


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  del pooled
  size = settings['chunk_size']
  return [window_group(window, t, lambda query, key: (key <= query) & same_chunk(
      query, key, size))]


SPEC = spec.KindSpec('chunked', chunked, ('chunk_size',), 'O(L c)',
                     'split, attend, concatenate baseline',
                     cache_layout=cache_layout, decode_keys=decode_keys)
