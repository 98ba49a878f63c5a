"""Sliding-window (local) attention and the blocked window it is built on.

`local`: query i attends key j iff |i - j| <= radius (and j <= i when causal),
within the same segment. Longformer's sliding window, LongT5's local attention,
Mistral/Gemma's sliding window in its causal form (their `sliding_window = W`
is radius = W - 1: a query sees itself and the W - 1 keys before it).

How it stays linear: the sequence is cut into tiles of `tile` >= radius
tokens. Every key a query in block n may see lies in blocks n-1, n, n+1 (only
n-1, n when causal), so each block of queries is scored against that window of
3 (or 2) blocks: a [block, 3 * block] score tile per block, O(length * radius)
time and memory in the forward and the backward pass. The window mask inside a
tile depends only on offsets within the tile, so it is a compile-time constant.

Decoding keeps a ring of the last radius + 1 positions; `window_visible` is
the one rule both the tiles and the decode mask are built from.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from longjax.attention import _blocks, _core, band, implementations, spec

# Smallest block used for tiny radii: very small tiles waste the matmul units
# and give XLA thousands of tiny blocks.
MIN_BLOCK = 16


def default_block(radius: int) -> int:
  return max(int(radius), MIN_BLOCK)


def window_visible(rel, *, radius: Optional[int], causal: bool):
  """Whether a query sees a key at rel = query_pos - key_pos (numpy or jax ints).

  The window rule of `local` (|rel| <= radius; radius None: no limit), causal
  when asked (rel >= 0). The blocked kernels build their tile masks with it and
  the decode rules their slot masks, so training and decoding share it.
  """
  visible = (abs(rel) <= radius) if radius is not None else (rel == rel)
  if causal:
    visible = visible & (rel >= 0)
  return visible


def window_part(q, k, v, *, block: int, before: int, after: int,
                radius: Optional[int], causal: bool, segment_ids=None,
                bias_fn: Optional[_core.BiasFn] = None, key_exclude=None,
                weight_fn: Optional[Callable] = None) -> _core.Part:
  """Attention of each block of queries to its neighbouring key blocks.

  Args:
    q: [b, kv_heads, group, l, d], scaled; k, v: [b, kv_heads, l, d] (heads-major).
    block: tile length; before/after: how many neighbouring key blocks each
      query block sees on each side (1/1 sliding window, 1/0 causal window,
      0/0 independent chunks).
    radius: keys farther than this from the query are masked; None = the whole
      neighbouring blocks.
    segment_ids: [b, l] int32 or None.
    bias_fn: maps query_pos - key_pos to an additive [.., heads] bias.
    key_exclude: [b, l] bool, keys this part must not use (they are counted
      in another part, e.g. global tokens).
    weight_fn: maps the [block, window] relative positions to a multiplicative
      [kv_heads, group, block, window] weight (adaptive span's soft mask).
  Returns:
    A Part over the first l queries.
  """
  b, kv_heads, group, length, d = q.shape
  n = -(-length // block)
  padded = n * block
  before, after = min(before, n - 1), min(after, n - 1)
  width = (before + 1 + after) * block

  qb = _core.pad_axis(q, 3, padded).reshape(b, kv_heads, group, n, block, d)
  qb = jnp.swapaxes(qb, 2, 3)  # [b, hk, n, g, block, d]
  blocks = lambda x, axis: _core.pad_axis(x, axis, padded).reshape(
      x.shape[:axis] + (n, block) + x.shape[axis + 1:])
  window = lambda x, axis: _core.neighbor_blocks(blocks(x, axis), before=before, after=after,
                                                 axis=axis)
  kw, vw = window(k, 2), window(v, 2)  # [b, hk, n, width, d]

  # Offsets inside a tile: query r of block m is at m * block + r, key t of its
  # window at (m - before) * block + t.
  r = np.arange(block)[:, None]
  t = np.arange(width)[None, :]
  rel = r - t + before * block  # query_pos - key_pos, the same for every block
  mask = window_visible(rel, radius=radius, causal=causal)
  key_pos = (np.arange(n)[:, None] - before) * block + np.arange(width)[None, :]
  mask = mask[None] & ((key_pos >= 0) & (key_pos < length))[:, None, :]
  mask = jnp.asarray(mask)[None, None, :, None]  # [1, 1, n, 1, block, width]

  if segment_ids is not None:
    same = blocks(segment_ids, 1)[:, :, :, None] == window(segment_ids, 1)[:, :, None, :]
    mask = mask & same[:, None, :, None]
  if key_exclude is not None:
    mask = mask & ~window(key_exclude, 1)[:, None, :, None, None, :]

  bias = None
  if bias_fn is not None:
    bias = _core.bias_tile(bias_fn, rel, kv_heads)[None, :, None]
  weight = None
  if weight_fn is not None:
    weight = weight_fn(rel)[None, :, None]  # [1, hk, 1, g, block, width]
    mask = mask & (weight > 0)
  part = _blocks.attend_blocks(qb, kw, vw, mask=mask, bias=bias, weight=weight)
  return _core.slice_part(part, length)


def local(q, k, v, *, radius: int, causal: bool = False, segment_ids=None,
          bias_fn: Optional[_core.BiasFn] = None, scale: Optional[float] = None,
          implementation: str = 'auto', tile: Optional[int] = None):
  """Sliding-window attention: query i sees key j iff |i - j| <= radius.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads,
      head_dim] with heads % kv_heads == 0 (grouped-query attention).
    radius: window radius (>= 1); causal windows see radius keys back.
      Mistral's / Gemma's `sliding_window = W` is radius = W - 1 (causal).
    causal: also require j <= i.
    segment_ids: [batch, length] ints; tokens attend only within their segment.
    bias_fn: optional position bias, f(query_pos - key_pos) -> [..., heads].
    scale: softmax scale, default 1/sqrt(head_dim).
    implementation: 'auto', 'xla' (blocked, everywhere), 'cudnn' (GPU, causal
      only: jax.nn.dot_product_attention(local_window_size=(radius, 0))),
      'splash' (TPU) or 'pallas_gpu' (GPU); see longjax.attention.implementations.
    tile: the XLA kernel's tile length (>= radius); default max(radius, 16).
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'local'
  qh, kh, vh, segment_ids, _ = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  radius = _core.check_positive_int(radius, name, 'radius')
  found = implementations.problems(
      q, segment_ids=segment_ids, bias_fn=bias_fn, window=radius,
      extra={'cudnn': '' if causal else 'cuDNN has only a left window (bidirectional local)'})
  choice = implementations.choose(implementation, name, supported=SPEC.implementations,
                                  problems_found=found)
  if choice.name == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=(radius, 0), implementation='cudnn')
  if choice.name != 'xla':
    return band.output(choice, qh, kh, vh, left=radius, right=0 if causal else radius,
                       causal=causal, segment_ids=segment_ids, dtype=q.dtype)
  tile = tile or default_block(radius)
  if tile < radius:
    raise ValueError(f'{name}: tile ({tile}) must be >= radius ({radius}).')
  part = window_part(qh, kh, vh, block=tile, before=1, after=0 if causal else 1,
                     radius=radius, causal=causal, segment_ids=segment_ids, bias_fn=bias_fn)
  return _core.merge([part], q.dtype)


# Decoding: a ring of the last radius + 1 positions.
def ring_length(count: int, max_length: int) -> int:
  """A ring never needs more slots than there are positions to decode."""
  return min(count, max_length)


def window_keys(length: int, radius: int, causal: bool) -> np.ndarray:
  """bool [length]: the keys of one row the budget query's window sees."""
  rel = spec.budget_query(length, causal) - np.arange(length)
  return np.asarray(window_visible(rel, radius=radius, causal=causal))


def keys_per_query(settings, length: int, causal: bool) -> int:
  """The window: min(2r + 1, length) keys bidirectionally, r + 1 causally."""
  return int(window_keys(length, settings['radius'], causal).sum())


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return spec.CacheLayout(pinned=0, ring=ring_length(settings['radius'] + 1, max_length))


def window_group(window: spec.Slots, t, visible, weight=None) -> spec.KeyGroup:
  """The window buffer's slots that a query at t [b] sees.

  visible(query_pos [b, 1], key_pos [b, slots]) -> bool, the kind's rule;
  weight: [b, heads, slots] multiplicative weights (zero = masked), or None.
  """
  rel = t[:, None] - window.held
  mask = (window.held >= 0) & visible(t[:, None], window.held)
  if weight is not None:
    mask = mask[:, None, :] & (weight > 0)
  return spec.KeyGroup(window.k, window.v, mask, rel=rel, weight=weight)


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  del pooled
  return [window_group(window, t, lambda query, key: window_visible(
      query - key, radius=settings['radius'], causal=True))]


SPEC = spec.KindSpec(
    'local', local, ('radius',), 'O(L r)',
    'Longformer sliding window (Beltagy et al. 2020); LongT5 local',
    cache_layout=cache_layout, decode_keys=decode_keys,
    implementations=('xla', 'cudnn', 'splash', 'pallas_gpu'),
    tile=lambda settings: default_block(settings['radius']),
    keys_per_query=keys_per_query, budget_param='radius', windowed=True)
