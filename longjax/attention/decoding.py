"""Single-query attention over a key/value cache, for decoding token by token.

When a model generates, each new token is one query that attends keys already
computed and kept in a cache. The cache holds them in *slots* (a ring buffer
for a sliding window, pinned slots for global tokens, pooled summaries), so
which slot a query may see is a mask computed from the position each slot
holds; the caller (`longjax.models.cache`) builds that mask from the kernel's
definition of its kind, and this function only scores, masks and normalises.

Keys may come in several groups (a window plus block summaries, or the levels
of a hierarchy), all normalised together in one softmax by flash attention's
log-sum-exp merge, as the blocked kernels merge their parts. Numerics follow
the kernels: the query is scaled in its own dtype, scores, softmax and
accumulation are float32, the matmuls take the input dtype.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from longjax.attention import _core


class KeyGroup(NamedTuple):
  """Keys one query may attend, with what the kernel adds to their scores.

  k, v: [batch, kv_heads, slots, head_dim] (heads-major: each head's keys contiguous).
  mask: bool [batch, slots], or [batch, heads, slots] when it differs by head.
  rel: int [batch, slots], query position - key position, for a position
    bias (None: no bias for this group).
  log_weight: float [batch, slots] added to the score (log of how many tokens
    a pooled key stands for), or None.
  weight: float [batch, heads, slots] multiplying the unnormalised probability
    (adaptive span's soft mask), or None; keys of weight 0 must be masked.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  rel: Optional[jax.Array] = None
  log_weight: Optional[jax.Array] = None
  weight: Optional[jax.Array] = None


def _per_head(x, kv_heads):
  """[b, heads, n] -> [b, kv_heads, group, n]; [b, n] -> [b, 1, 1, n]."""
  if x.ndim == 2:
    return x[:, None, None, :]
  b, h, n = x.shape
  return x.reshape(b, kv_heads, h // kv_heads, n)


class _Stats(NamedTuple):
  """Flash-attention statistics of one key group: max, sum [b, hk, g]; out [b, hk, g, d]."""
  max: jax.Array
  sum: jax.Array
  out: jax.Array


def _group_stats(qg, group: KeyGroup, bias_fn) -> _Stats:
  """Unnormalised softmax statistics of one key group; qg [b, kv_heads, g, d], scaled."""
  kv_heads, size = qg.shape[1], qg.shape[2]
  scores = jnp.einsum('bhgd,bhnd->bhgn', qg, group.k, preferred_element_type=jnp.float32)
  if bias_fn is not None and group.rel is not None:
    bias = bias_fn(jnp.asarray(group.rel, jnp.int32)).astype(jnp.float32)  # [b, n, heads]
    b, n, _ = bias.shape
    scores = scores + jnp.moveaxis(bias, 1, 2).reshape(b, kv_heads, size, n)
  if group.log_weight is not None:
    scores = scores + group.log_weight[:, None, None, :].astype(jnp.float32)
  mask = _per_head(group.mask, kv_heads)
  scores = jnp.where(mask, scores, _core.MASK_VALUE)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
  probs = jnp.where(mask, jnp.exp(scores - row_max[..., None]), 0.0)
  if group.weight is not None:
    probs = probs * _per_head(group.weight, kv_heads).astype(jnp.float32)
  out = jnp.einsum('bhgn,bhnd->bhgd', probs.astype(group.v.dtype), group.v,
                   preferred_element_type=jnp.float32)
  return _Stats(row_max, jnp.sum(probs, axis=-1), out)


def _merge(stats: Sequence[_Stats]):
  """One softmax over the union of the groups (log-sum-exp merge); -> [b, hk, g, d] f32."""
  total_max = stats[0].max
  for s in stats[1:]:
    total_max = jnp.maximum(total_max, s.max)
  total_sum, total_out = 0.0, 0.0
  for s in stats:
    correction = jnp.exp(s.max - total_max)
    total_sum = total_sum + s.sum * correction
    total_out = total_out + s.out * correction[..., None]
  return total_out / jnp.where(total_sum > 0, total_sum, 1.0)[..., None]


def attend(q, groups: Sequence[KeyGroup], *, bias_fn: Optional[Callable] = None,
           scale: Optional[float] = None):
  """One query per row attends the union of `groups` in a single softmax.

  Args:
    q: [batch, heads, head_dim], the query of the token being decoded.
    groups: key groups (see KeyGroup); heads % kv_heads == 0 (grouped-query).
    bias_fn: f(query_pos - key_pos) -> [..., heads], applied to groups with `rel`.
    scale: softmax scale, default 1/sqrt(head_dim).
  Returns:
    [batch, heads, head_dim] in q's dtype; a row that sees no key gives zeros.
  """
  if q.ndim != 3:
    raise ValueError(f'attend: q must be [batch, heads, head_dim]; got {q.shape}.')
  if not groups:
    raise ValueError('attend: needs at least one key group.')
  batch, heads, dim = q.shape
  kv_heads = groups[0].k.shape[1]
  for group in groups:
    if group.k.shape != group.v.shape or group.k.shape[0] != batch or group.k.shape[3] != dim:
      raise ValueError(f'attend: keys {group.k.shape} / values {group.v.shape} do not match '
                       f'the query {q.shape}.')
    if group.k.shape[1] != kv_heads or heads % kv_heads:
      raise ValueError(f'attend: query heads ({heads}) must be a multiple of the same '
                       f'kv_heads in every group; got {group.k.shape[1]}.')
  scale = _core.default_scale(dim, scale)
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(batch, kv_heads, heads // kv_heads, dim)
  out = _merge([_group_stats(qg, group, bias_fn) for group in groups])
  return out.reshape(batch, heads, dim).astype(q.dtype)
