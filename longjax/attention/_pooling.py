"""Mean-pooled keys and values over fixed groups of tokens, segment-aware.

Multiresolution attention (coarser keys at each level) replaces a group of
consecutive tokens by the mean of their keys and values.

With packed sequences a group can straddle a segment boundary. A token must
never see another segment, so the pooled key a query sees is the mean over
the group's tokens *in the query's own segment*. Since segments are
contiguous, a group either lies inside one segment ("pure": its plain mean
serves every query of that segment) or contains a boundary of the query's
segment; a query has at most two such "boundary groups" per group size (the
one holding its segment's first token and the one holding its last). Their
partial means are computed per query from within-group prefix sums: O(length)
gathers per group size, no [length, length] array.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from longjax.attention import _core


class Pooled(NamedTuple):
  """Group means. k, v: [b, kv_heads, groups, d]; count (valid tokens),
  segment and pure: [b, groups]. `pure` groups have >= 1 token, all of one
  segment (`segment`); impure groups are seen only through boundary keys."""
  k: jax.Array
  v: jax.Array
  count: jax.Array
  segment: jax.Array
  pure: jax.Array


class Boundary(NamedTuple):
  """Per-query partial means of the (at most two) boundary groups of its segment.

  k, v: [b, kv_heads, l, 2, d]; count: [b, l, 2] float; group: [b, l, 2]
  int32 (index of the group); exists: [b, l, 2] bool.
  """
  k: jax.Array
  v: jax.Array
  count: jax.Array
  group: jax.Array
  exists: jax.Array


def pool_groups(k, v, *, group_size: int, num_groups: int, length: int,
                segment_ids=None) -> Pooled:
  """Mean of k and v [b, kv_heads, l, d] over tokens [c * group_size, (c + 1) * group_size) ∩ [0, length)."""
  b, hk, _, d = k.shape
  padded = num_groups * group_size
  valid = jnp.arange(padded) < length
  sums = lambda x: _core.pad_axis(x.astype(jnp.float32), 2, padded).reshape(
      b, hk, num_groups, group_size, d).sum(axis=3)
  count = valid.reshape(num_groups, group_size).sum(axis=1).astype(jnp.float32)
  count = jnp.broadcast_to(count, (b, num_groups))
  safe = jnp.maximum(count, 1.0)[:, None, :, None]
  k_mean = (sums(k) / safe).astype(k.dtype)
  v_mean = (sums(v) / safe).astype(v.dtype)
  if segment_ids is None:
    return Pooled(k_mean, v_mean, count, jnp.zeros((b, num_groups), jnp.int32), count > 0)
  seg = _core.pad_axis(segment_ids, 1, padded).reshape(b, num_groups, group_size)
  big = jnp.iinfo(jnp.int32).max
  seg_min = jnp.where(valid.reshape(num_groups, group_size), seg, big).min(axis=2)
  seg_max = jnp.where(valid.reshape(num_groups, group_size), seg, -big).max(axis=2)
  return Pooled(k_mean, v_mean, count, seg_min, (count > 0) & (seg_min == seg_max))


def boundary_keys(k, v, *, group_size: int, segment_ids) -> Boundary:
  """Partial group means of each query's segment-boundary groups (see module doc).

  k, v: [b, kv_heads, l, d] (heads-major).
  """
  b, hk, length, d = k.shape
  s = group_size
  num_groups = -(-length // s)
  padded = num_groups * s
  start, end = _core.segment_bounds(segment_ids)  # [b, l]

  # Inclusive prefix sums restarting at every group: partial sums stay as
  # small as a group, so fp32 keeps them exact enough at any length.
  def prefix(x):
    x = _core.pad_axis(x.astype(jnp.float32), 2, padded)
    inclusive = jnp.cumsum(x.reshape(b, hk, num_groups, s, d), axis=3)
    return x, inclusive.reshape(b, hk, padded, d)

  k_x, k_inc = prefix(k)
  v_x, v_inc = prefix(v)

  def range_mean(x, inc, lo, hi):
    """Mean over [lo, hi) for ranges inside one group; lo, hi: [b, l] -> [b, hk, l, d]."""
    at = lambda a, i: jnp.take_along_axis(a, i[:, None, :, None], axis=2)
    total = at(inc, hi - 1) - at(inc, lo) + at(x, lo)
    return total / jnp.maximum(hi - lo, 1)[:, None, :, None].astype(jnp.float32)

  group_end = lambda c: jnp.minimum((c + 1) * s, length)
  first = start // s
  last = (end - 1) // s
  # Group `first` covers [start, min(its end, segment end)).
  a_lo, a_hi = start, jnp.minimum(group_end(first), end)
  a_exists = (first * s < start) | (group_end(first) > end)
  # Group `last` (if another group) covers [its start, segment end).
  b_lo, b_hi = last * s, end
  b_exists = (last != first) & (group_end(last) > end)

  stack = lambda x, y, axis: jnp.stack([x, y], axis=axis)
  keys = stack(range_mean(k_x, k_inc, a_lo, a_hi), range_mean(k_x, k_inc, b_lo, b_hi), 3)
  values = stack(range_mean(v_x, v_inc, a_lo, a_hi), range_mean(v_x, v_inc, b_lo, b_hi), 3)
  count = stack(a_hi - a_lo, b_hi - b_lo, 2).astype(jnp.float32)
  return Boundary(keys.astype(k.dtype), values.astype(v.dtype), count,
                  stack(first, last, 2), stack(a_exists, b_exists, 2))
