"""Adaptive attention span (Sukhbaatar et al., 2019, "Adaptive Attention Span
in Transformers").

Each head h has a span z_h in [0, max_span] (learned by the model; an input
here). Attention is local with radius max_span, and the weight of a key at
distance x = |i - j| is multiplied by the soft mask

    m_z(x) = clamp((R + z - x) / R, 0, 1)          (R = ramp)

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

import jax.numpy as jnp
import numpy as np

from longjax.attention import _core
from longjax.attention.local import default_block, window_part


def soft_mask(distance, spans, ramp: float):
  """m_z(x) = clamp((R + z - x) / R, 0, 1); distance [...], spans [heads] -> [heads, ...]."""
  spans = jnp.asarray(spans, jnp.float32)
  distance = jnp.asarray(distance, jnp.float32)
  z = spans.reshape(spans.shape + (1,) * distance.ndim)
  return jnp.clip((ramp + z - distance) / ramp, 0.0, 1.0)


def span_penalty(spans):
  """The paper's span loss: the mean span over heads, in tokens."""
  return jnp.mean(jnp.asarray(spans, jnp.float32))


def needed_radius(spans, *, ramp: float, max_span: int) -> int:
  """Smallest radius whose window holds every key with nonzero weight.

  Takes concrete spans (e.g. the trained parameter); m_z(x) > 0 iff x < R + z.
  """
  largest = float(np.max(np.asarray(spans)))
  return int(min(max_span, max(1, math.ceil(ramp + max(largest, 0.0)) - 1)))


def adaptive_span(q, k, v, *, spans, max_span: int, ramp: float = 32.0,
                  causal: bool = False, segment_ids=None,
                  bias_fn: Optional[_core.BiasFn] = None,
                  scale: Optional[float] = None, radius: Optional[int] = None):
  """Local attention within max_span, softly masked by a span per head.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    spans: [heads] float, the span z of each head (clipped to [0, max_span]).
    max_span: the largest span; the window radius.
    ramp: width R of the soft mask's ramp (> 0).
    causal, segment_ids, bias_fn, scale: as in `local`.
    radius: optional smaller window (<= max_span), e.g. `needed_radius(spans)`
      at evaluation; the result is unchanged as long as it covers R + z - 1.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'adaptive_span'
  batch, length, kv_len, heads, kv_heads, dim = _core.check_qkv(q, k, v, name)
  if kv_len != length:
    raise ValueError(f'{name}: is self-attention; q and k lengths differ ({length} vs {kv_len}).')
  max_span = _core.check_positive_int(max_span, name, 'max_span')
  if not ramp > 0:
    raise ValueError(f'{name}: ramp must be > 0; got {ramp!r}.')
  radius = max_span if radius is None else min(
      _core.check_positive_int(radius, name, 'radius'), max_span)
  spans = jnp.clip(jnp.asarray(spans, jnp.float32), 0.0, max_span)
  if spans.shape != (heads,):
    raise ValueError(f'{name}: spans must be [heads] = ({heads},); got {spans.shape}.')
  segment_ids = _core.check_segment_ids(segment_ids, batch, length, name)
  def weight_fn(rel):
    weight = soft_mask(np.abs(rel), spans, ramp)  # [heads, block, width]
    return weight.reshape((kv_heads, heads // kv_heads) + weight.shape[1:])

  part = window_part(_core.scaled_queries(q, kv_heads, dim, scale), _core.heads_major(k),
                     _core.heads_major(v), block=default_block(radius), before=1,
                     after=0 if causal else 1, radius=radius, causal=causal,
                     segment_ids=segment_ids, bias_fn=bias_fn, weight_fn=weight_fn)
  return _core.merge([part], q.dtype)
