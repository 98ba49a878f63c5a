"""Adaptive attention span (Sukhbaatar et al., 2019, "Adaptive Attention Span
in Transformers").

Each head h has a span z_h in [0, max_span] (learned by the model; an input
here). Attention is local with radius max_span, and the weight of a key at
distance x = |i - j| is multiplied by the soft mask

    m_z(x) = clamp((R + z - x) / R, 0, 1)          (R = span_ramp)

then renormalised over the window, as in the paper (eq. 3):

    a_ij = m_z(x_ij) exp(s_ij) / sum_k m_z(x_ik) exp(s_ik).

m_z is 1 up to distance z, falls linearly to 0 at distance z + R, and its
gradient moves z. The model adds `span_penalty(spans)` times a coefficient
to the loss (the paper's L1 penalty on spans), which shrinks spans that do not
pay for themselves. At evaluation, `needed_radius(spans)` tells the smallest
window that gives the same result, so a trained model with short spans costs
less than its max_span.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from longjax.attention import _core, implementations, spec
from longjax.attention.local import (default_block, ring_length, window_group, window_keys,
                                     window_part, window_visible)


def soft_mask(distance, spans, ramp: float):
  """m_z(x) = clamp((R + z - x) / R, 0, 1), R = ramp.

  distance [...], spans [heads] -> [heads, ...].
  """
  spans = jnp.asarray(spans, jnp.float32)
  distance = jnp.asarray(distance, jnp.float32)
  z = spans.reshape(spans.shape + (1,) * distance.ndim)
  return jnp.clip((ramp + z - distance) / ramp, 0.0, 1.0)


def span_penalty(spans):
  """The paper's span loss: the mean span over heads, in tokens."""
  return jnp.mean(jnp.asarray(spans, jnp.float32))


def needed_radius(spans, *, span_ramp: float, max_span: int) -> int:
  """Smallest radius whose window holds every key with nonzero weight.

  Takes concrete spans (e.g. the trained parameter); m_z(x) > 0 iff x < R + z.
  """
  largest = float(np.max(np.asarray(spans)))
  return int(min(max_span, max(1, math.ceil(span_ramp + max(largest, 0.0)) - 1)))


def adaptive_span(q, k, v, *, spans, max_span: int, span_ramp: float = 32.0,
                  causal: bool = False, segment_ids=None,
                  bias_fn: Optional[_core.BiasFn] = None,
                  scale: Optional[float] = None, radius: Optional[int] = None,
                  implementation: str = 'auto'):
  """Local attention within max_span, softly masked by a span per head.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    spans: [heads] float, the span z of each head (clipped to [0, max_span]).
    max_span: the largest span; the window radius.
    span_ramp: width R of the soft mask's ramp (> 0).
    causal, segment_ids, bias_fn, scale, implementation: as in `local`.
    radius: optional smaller window (<= max_span), e.g. `needed_radius(spans)`
      at evaluation; the result is unchanged as long as it covers R + z - 1.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'adaptive_span'
  qh, kh, vh, segment_ids, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  max_span = _core.check_positive_int(max_span, name, 'max_span')
  if not span_ramp > 0:
    raise ValueError(f'{name}: span_ramp must be > 0; got {span_ramp!r}.')
  implementations.choose(implementation, name, supported=SPEC.implementations)
  radius = max_span if radius is None else min(
      _core.check_positive_int(radius, name, 'radius'), max_span)
  spans = _clipped_spans(spans, max_span, dims.heads, name)

  def weight_fn(rel):
    weight = soft_mask(np.abs(rel), spans, span_ramp)  # [heads, block, width]
    return weight.reshape((dims.kv_heads, dims.heads // dims.kv_heads) + weight.shape[1:])

  part = window_part(qh, kh, vh, block=default_block(radius), before=1,
                     after=0 if causal else 1, radius=radius, causal=causal,
                     segment_ids=segment_ids, bias_fn=bias_fn, weight_fn=weight_fn)
  return _core.merge([part], q.dtype)


def _clipped_spans(spans, max_span: int, heads: int, name: str):
  # Spans outside [0, max_span] are used as the nearest bound, but the
  # gradient passes straight through: the model keeps its span parameters in
  # range by clamping them after each optimizer update (Sukhbaatar et al.'s
  # clamp_param), and a span sitting at a bound must keep its full gradient.
  spans = jnp.asarray(spans, jnp.float32)
  spans = spans + jax.lax.stop_gradient(jnp.clip(spans, 0.0, max_span) - spans)
  if spans.shape != (heads,):
    raise ValueError(f'{name}: spans must be [heads] = ({heads},); got {spans.shape}.')
  return spans


# Decoding: a ring of the last max_span + 1 positions, weighted by the soft mask.
def keys_per_query(settings, length: int, causal: bool) -> int:
  """The window of radius max_span (the most a head reaches; a learned span z
  weights keys beyond z + R by 0, see `needed_radius`)."""
  return int(window_keys(length, settings['max_span'], causal).sum())


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return spec.CacheLayout(pinned=0, ring=ring_length(settings['max_span'] + 1, max_length))


def decode_keys(settings, window: spec.Slots, pooled, t, *, spans) -> list:
  """spans: [heads], the layer's learned span of each head in tokens."""
  del pooled
  max_span = settings['max_span']
  spans = _clipped_spans(spans, max_span, jnp.shape(spans)[0], 'adaptive_span')
  rel = t[:, None] - window.held
  weight = jnp.moveaxis(soft_mask(rel, spans, settings['span_ramp']), 0, 1)  # [b, heads, slots]
  return [window_group(window, t, lambda query, key: window_visible(
      query - key, radius=max_span, causal=True), weight=weight)]


SPEC = spec.KindSpec(
    'adaptive_span', adaptive_span, ('max_span', 'span_ramp'), 'O(L S)',
    'Adaptive attention span (Sukhbaatar et al. 2019)',
    cache_layout=cache_layout, decode_keys=decode_keys, learns_spans=True,
    tile=lambda settings: default_block(settings['max_span']),
    keys_per_query=keys_per_query, budget_param='max_span', windowed=True)
