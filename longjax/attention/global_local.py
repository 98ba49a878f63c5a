"""Global + local attention (Longformer / ETC global tokens, attention sinks).

Every query attends its sliding window (|i - j| <= radius) and every global
token; global tokens attend every key. When causal, every query still sees
only keys j <= i (for a causal LM the first tokens then act as the "attention
sinks" of StreamingLLM). Tokens attend only within their own segment.

Global positions are 0 .. num_global-1, or any per-token boolean mask
(question tokens, a [CLS] per sentence) with at most `num_global` true entries
per row. Cost: O(length * (radius + num_global)).

How: three pieces, each linear in length.
  1. the blocked sliding window of `local`, with global keys removed from it so
     that no key is counted twice;
  2. every query against the gathered global keys ([length, num_global] scores),
     normalised together with 1. in one softmax;
  3. the global queries against all keys ([num_global, length] scores); their
     rows replace the rows 1.+2. gave them.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from longjax.attention import _core, spec
from longjax.attention.local import (default_block, ring_length, window_group, window_part,
                                     window_visible)


def prefix_global(position, num_global: int):
  """Whether a position is one of the prefix global tokens (numpy or jax ints)."""
  return position < num_global


def _global_indices(global_mask, num_global):
  """Positions of the first num_global global tokens per row, and their validity."""
  # A stable sort of "not global" puts global positions first, in order.
  order = jnp.argsort(~global_mask, axis=1, stable=True)[:, :num_global]
  valid = jnp.take_along_axis(global_mask, order, axis=1)
  return order.astype(jnp.int32), valid


def global_local(q, k, v, *, radius: int, num_global: int, causal: bool = False,
                 segment_ids=None, global_mask=None,
                 bias_fn: Optional[_core.BiasFn] = None,
                 scale: Optional[float] = None, tile: Optional[int] = None,
                 implementation: str = 'auto'):
  """Sliding window of `radius` plus global tokens.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    radius: local window radius (>= 1).
    num_global: number of global positions (0 .. num_global-1), or, with
      `global_mask`, the most global tokens a row may have (extra true entries
      beyond the first num_global are treated as local).
    causal: only keys j <= i, global or not.
    segment_ids: [batch, length] ints.
    global_mask: optional [batch, length] bool marking global tokens.
    bias_fn, scale, tile, implementation: as in `local`.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'global_local'
  qh, kh, vh, segment_ids, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  batch, length, kv_heads = dims.batch, dims.length, dims.kv_heads
  radius = _core.check_positive_int(radius, name, 'radius')
  num_global = _core.check_positive_int(num_global, name, 'num_global', minimum=0)
  _core.resolve_implementation(implementation, name, supported=SPEC.implementations)
  num_global = min(num_global, length)
  positions = jnp.arange(length, dtype=jnp.int32)

  if global_mask is None:  # The prefix: every position p with prefix_global(p, num_global).
    global_idx = jnp.broadcast_to(positions[:num_global], (batch, num_global))
    global_valid = jnp.ones((batch, num_global), bool)
  else:
    if global_mask.shape != (batch, length):
      raise ValueError(f'{name}: global_mask must be [batch, length] = {(batch, length)}; '
                       f'got {global_mask.shape}.')
    global_idx, global_valid = _global_indices(global_mask.astype(bool), num_global)
  rows = jnp.arange(batch)[:, None]
  is_global = jnp.zeros((batch, length), bool).at[rows, global_idx].max(global_valid)

  window = window_part(qh, kh, vh, block=tile or default_block(radius), before=1,
                       after=0 if causal else 1,
                       radius=radius, causal=causal, segment_ids=segment_ids,
                       bias_fn=bias_fn, key_exclude=is_global)
  if num_global == 0:
    return _core.merge([window], q.dtype)

  # Gathers the global positions along the length axis `axis` of x.
  def take(x, axis):
    shape = [1] * x.ndim
    shape[0], shape[axis] = batch, num_global
    return jnp.take_along_axis(x, global_idx.reshape(shape), axis=axis)

  seg = segment_ids if segment_ids is not None else jnp.zeros((batch, length), jnp.int32)
  seg_glob = take(seg, 1)

  # 2. Every query against the global keys: a [l, G] tile.
  rel = positions[None, :, None] - global_idx[:, None, :]  # [b, l, G]
  mask = global_valid[:, None, :] & (seg[:, :, None] == seg_glob[:, None, :])
  if causal:
    mask &= rel >= 0
  bias = None
  if bias_fn is not None:  # [b, l, G, hk, g] -> [b, hk, 1, g, l, G]
    bias = jnp.moveaxis(_core.bias_heads(bias_fn, rel, kv_heads), (3, 4), (1, 2))[:, :, None]
  to_global = _core.attend_blocks(qh[:, :, None], take(kh, 2)[:, :, None],
                                  take(vh, 2)[:, :, None], mask=mask[:, None, None, None],
                                  bias=bias)
  out = _core.merge([window, to_global], q.dtype)

  # 3. Global queries attend every key ([G, l] tile); their rows replace the local ones.
  rel = global_idx[:, :, None] - positions[None, None, :]  # [b, G, l]
  mask = seg_glob[:, :, None] == seg[:, None, :]
  if causal:
    mask &= rel >= 0
  bias = None
  if bias_fn is not None:
    bias = jnp.moveaxis(_core.bias_heads(bias_fn, rel, kv_heads), (3, 4), (1, 2))[:, :, None]
  from_global = _core.attend_blocks(take(qh, 3)[:, :, None], kh[:, :, None], vh[:, :, None],
                                    mask=mask[:, None, None, None], bias=bias)
  out_glob = _core.merge([from_global], q.dtype)  # [b, G, heads, d]
  # Invalid (padding) entries of global_idx point at real positions: write
  # those rows back unchanged.
  current = jnp.take_along_axis(out, global_idx[:, :, None, None], axis=1)
  out_glob = jnp.where(global_valid[:, :, None, None], out_glob, current)
  return out.at[rows, global_idx].set(out_glob)


# Decoding (prefix global tokens only): the first num_global positions stay
# pinned in the cache (attention sinks), the window is a ring.
def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return spec.CacheLayout(pinned=min(settings['num_global'], max_length),
                          ring=ring_length(settings['radius'] + 1, max_length))


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  del pooled
  radius, num_global = settings['radius'], settings['num_global']
  return [window_group(window, t, lambda query, key: (key <= query) & (
      prefix_global(key, num_global) | window_visible(query - key, radius=radius, causal=True)))]


SPEC = spec.KindSpec(
    'global_local', global_local, ('radius', 'num_global'), 'O(L (r + g))',
    'Longformer / ETC global tokens; attention sinks (Xiao et al. 2023)',
    cache_layout=cache_layout, decode_keys=decode_keys, accepts_global_mask=True)
