"""Chunked attention: the "split, attend, concatenate" baseline.

The sequence is cut into independent chunks of `chunk_size` tokens and every
chunk attends only to itself (causally when asked). It is what one gets by
running a short-context model over a long input piece by piece, and the
baseline every long-range method should beat. O(length * chunk_size).

Chunks are aligned to the document: with segment_ids, each segment's chunks
start at its first token, so a packed document is chunked as it is alone.
(With model.positions = 'learned' the model restarts positions in every chunk,
so the model is exactly "split, attend, concatenate"; RoPE and T5 biases are
relative and need nothing.)

The kernel is the blocked window of `local` with tiles of one chunk and no
neighbours; with segments, the window of radius chunk_size - 1 over chunk
tiles and their neighbours, masked to the same (segment, chunk). Decoding
keeps a ring of one chunk and masks it with `same_chunk`.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from longjax.attention import _core, band, implementations, spec
from longjax.attention.local import ring_length, window_group, window_part


def same_chunk(query_pos, key_pos, chunk_size: int):
  """Whether a query and a key lie in the same chunk (numpy or jax ints;
  positions in their segment)."""
  return query_pos // chunk_size == key_pos // chunk_size


def chunk_ids(segment_ids, chunk_size: int):
  """[b, l] int32: a different id for every (segment, chunk) — the row position
  of the chunk's first token, its chunks counted from the segment's start."""
  start, _ = _core.segment_bounds(segment_ids)
  position = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  return position - (position - start) % chunk_size


def chunked(q, k, v, *, chunk_size: int, causal: bool = False, segment_ids=None,
            bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None,
            implementation: str = 'auto'):
  """Attention within independent chunks: i sees j iff i // chunk_size == j // chunk_size.

  Args as `local`, with `chunk_size` the chunk length (the last chunk may be shorter).
  """
  name = 'chunked'
  qh, kh, vh, segment_ids, _ = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  chunk_size = _core.check_positive_int(chunk_size, name, 'chunk_size')
  choice = implementations.choose(
      implementation, name, supported=SPEC.implementations,
      problems_found=implementations.problems(q, segment_ids=segment_ids, bias_fn=bias_fn,
                                              window=chunk_size - 1))
  if choice.name != 'xla':
    # The fused kernels' band of chunk_size - 1 over (segment, chunk) ids: a
    # chunk is a run of at most chunk_size tokens of one id.
    ids = chunk_ids(jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids,
                    chunk_size)
    return band.output(choice, qh, kh, vh, left=chunk_size - 1,
                       right=0 if causal else chunk_size - 1, causal=causal, segment_ids=ids,
                       dtype=q.dtype)
  if segment_ids is None:  # chunks are the row's tiles
    part = window_part(qh, kh, vh, block=chunk_size, before=0, after=0, radius=None,
                       causal=causal, segment_ids=None, bias_fn=bias_fn)
  else:  # a segment's chunk spans at most two tiles
    part = window_part(qh, kh, vh, block=chunk_size, before=1, after=0 if causal else 1,
                       radius=chunk_size - 1, causal=causal,
                       segment_ids=chunk_ids(segment_ids, chunk_size), bias_fn=bias_fn)
  return _core.merge([part], q.dtype)


def keys_per_query(settings, length: int, causal: bool) -> int:
  """The budget query's chunk (up to itself when causal)."""
  query, keys = spec.budget_query(length, causal), np.arange(length)
  visible = same_chunk(query, keys, settings['chunk_size'])
  if causal:
    visible &= keys <= query
  return int(visible.sum())


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return spec.CacheLayout(pinned=0, ring=ring_length(settings['chunk_size'], max_length))


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  del pooled
  size = settings['chunk_size']
  return [window_group(window, t, lambda query, key: (key <= query) & same_chunk(
      query, key, size))]


SPEC = spec.KindSpec('chunked', chunked, ('chunk_size',), 'O(L c)',
                     'split, attend, concatenate baseline',
                     cache_layout=cache_layout, decode_keys=decode_keys,
                     implementations=('xla', 'splash', 'pallas_gpu'),
                     tile=lambda settings: settings['chunk_size'],
                     keys_per_query=keys_per_query, budget_param='chunk_size', windowed=True)
