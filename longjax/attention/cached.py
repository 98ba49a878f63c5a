"""Single-query attention over a key/value cache, for decoding token by token.

When a model generates, each new token is one query that attends keys already
computed and kept in a cache. The cache holds them in *slots* (a ring buffer
for a sliding window, pinned slots for global tokens, pooled summaries); which
slot a query may see is the kind's decode rule (`KindSpec.decode_keys`,
written beside each kernel from the same visibility functions as its tiles),
which returns the slots as `KeyGroup`s. This function only scores, masks and
normalises them.

Each group is one *part* of the kernels' log-sum-exp merge (`_core.Part`)
with a query axis of length 1, so decoding normalises exactly as training
does: the same masked softmax statistics (`_core.softmax_stats`) and the same
merge (`_core.merge`). Numerics follow the kernels: the query is scaled in its
own dtype, scores, softmax and accumulation are float32, the matmuls take the
input dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax.numpy as jnp

from longjax.attention import _core
from longjax.attention.spec import KeyGroup


def _per_head(x, kv_heads):
  """[b, heads, n] -> [b, kv_heads, group, 1, n]; [b, n] -> [b, 1, 1, 1, n]."""
  if x.ndim == 2:
    return x[:, None, None, None, :]
  b, h, n = x.shape
  return x.reshape(b, kv_heads, h // kv_heads, 1, n)


def _group_part(qg, group: KeyGroup, bias_fn) -> _core.Part:
  """One key group as a Part; qg [b, kv_heads, g, 1, d], already scaled."""
  batch, kv_heads, size, _, dim = qg.shape
  n = group.k.shape[2]
  # The products over rows and heads merged ([b * kv_heads, ...], the cache's own
  # layout, `longjax.models.cache.KVBuffer`): with no size-1 axis for XLA to drop,
  # they read the cache buffer written this step in place rather than a copy.
  merged = lambda x: x.reshape((batch * kv_heads,) + x.shape[2:])
  scores = jnp.einsum('xgd,xnd->xgn', merged(qg[:, :, :, 0]), merged(group.k),
                      preferred_element_type=jnp.float32).reshape(batch, kv_heads, size, 1, n)
  if bias_fn is not None and group.rel is not None:
    bias = bias_fn(jnp.asarray(group.rel, jnp.int32)).astype(jnp.float32)  # [b, n, heads]
    scores = scores + jnp.moveaxis(bias, 1, 2).reshape(batch, kv_heads, size, 1, n)
  if group.log_weight is not None:
    scores = scores + _per_head(group.log_weight.astype(jnp.float32), kv_heads)
  if group.bias is not None:
    scores = scores + _per_head(group.bias.astype(jnp.float32), kv_heads)
  weight = None if group.weight is None else _per_head(
      group.weight.astype(jnp.float32), kv_heads)
  row_max, probs, row_sum = _core.softmax_stats(scores, _per_head(group.mask, kv_heads), weight)
  out = jnp.einsum('xgn,xnd->xgd', merged(probs[:, :, :, 0].astype(group.v.dtype)),
                   merged(group.v), preferred_element_type=jnp.float32)
  out = out.reshape(batch, kv_heads, size, 1, dim)
  return _core.Part(row_max, row_sum, out)


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
  scaled = lambda x: (x.astype(q.dtype) * jnp.asarray(scale, q.dtype)).reshape(
      batch, kv_heads, heads // kv_heads, 1, dim)
  qg = scaled(q)
  # A group may be scored with a query of its own (H-Transformer-1D's coarse query).
  out = _core.merge([_group_part(qg if group.query is None else scaled(group.query), group,
                                 bias_fn) for group in groups], q.dtype)
  return out[:, 0]  # [b, 1, heads, d] -> [b, heads, d]
