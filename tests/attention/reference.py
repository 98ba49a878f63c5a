"""Dense masked references for the attention kernels, written from the definitions.

Each builds the full [length, length] picture of who attends to what (and,
for pooled keys, which tokens each key averages) with plain numpy loops, then
evaluates one dense softmax in jax so gradients can be compared. They share
no code with longjax.attention.
"""
import functools
import math

import jax.numpy as jnp
import numpy as np


def _expand_kv(x, heads):
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def _segments(segment_ids, batch, length):
  if segment_ids is None:
    return np.zeros((batch, length), np.int64)
  return np.asarray(segment_ids, np.int64)


def dense(q, k, v, allowed, *, bias=None, weight=None, scale=None):
  """softmax over keys j with allowed[b, h or 1, i, j]; weight multiplies exp(score)."""
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  heads = q.shape[2]
  k, v = _expand_kv(k, heads), _expand_kv(v, heads)
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  s = jnp.einsum('bihd,bjhd->bhij', q, k) * scale
  if bias is not None:
    s = s + bias
  allowed = jnp.asarray(allowed)
  if weight is not None:
    allowed = allowed & (weight > 0)
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  if weight is not None:
    p = p * weight
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum('bhij,bjhd->bihd', p, v)


def mask_full(batch, q_len, kv_len, *, causal, segment_ids=None, kv_segment_ids=None):
  i = np.arange(q_len)[:, None] + (kv_len - q_len)
  j = np.arange(kv_len)[None, :]
  allowed = np.ones((batch, 1, q_len, kv_len), bool)
  if causal:
    allowed &= (j <= i)[None, None]
  if segment_ids is not None:
    kv = segment_ids if kv_segment_ids is None else kv_segment_ids
    allowed &= (np.asarray(segment_ids)[:, None, :, None] == np.asarray(kv)[:, None, None, :])
  return allowed


def mask_local(batch, length, *, radius, causal, segment_ids=None):
  allowed = mask_full(batch, length, length, causal=causal, segment_ids=segment_ids)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  return allowed & (np.abs(i - j) <= radius)[None, None]


def mask_chunked(batch, length, *, block_size, causal, segment_ids=None):
  allowed = mask_full(batch, length, length, causal=causal, segment_ids=segment_ids)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  return allowed & (i // block_size == j // block_size)[None, None]


def mask_global_local(batch, length, *, radius, is_global, causal, segment_ids=None):
  """is_global: [batch, length] bool."""
  allowed = mask_full(batch, length, length, causal=causal, segment_ids=segment_ids)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  near = (np.abs(i - j) <= radius)[None]
  g = np.asarray(is_global)
  visible = near | g[:, :, None] | g[:, None, :]
  return allowed & visible[:, None]


def adaptive_weight(length, spans, ramp):
  x = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
  z = jnp.asarray(spans, jnp.float32)[:, None, None]
  return jnp.clip((ramp + z - x) / ramp, 0.0, 1.0)[None]  # [1, heads, i, j]


def _pooled_dense(q, k, v, averaging, allowed, log_weight, extra=None, scale=None):
  """Attention where key (i, j) of query i is sum_t averaging[b, i, j, t] * k[t]."""
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  heads = q.shape[2]
  k, v = _expand_kv(k, heads), _expand_kv(v, heads)
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  a = jnp.asarray(averaging, jnp.float32)
  kk = jnp.einsum('bijt,bthd->bijhd', a, k)
  vv = jnp.einsum('bijt,bthd->bijhd', a, v)
  s = jnp.einsum('bihd,bijhd->bhij', q, kk) * scale + jnp.asarray(log_weight)[:, None]
  allowed = jnp.asarray(allowed)[:, None]
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum('bhij,bijhd->bihd', p, vv)


def hierarchical(q, k, v, *, block_size, causal, segment_ids=None):
  """H-matrix attention from its definition, token by token."""
  batch, length = q.shape[:2]
  seg = _segments(segment_ids, batch, length)
  averaging, allowed = _hierarchical_structure(length, block_size, causal, seg.tobytes(),
                                               seg.shape)
  # Every token j of a coarse group carries the group mean: the group then
  # weighs len(group) in the softmax, as the kernel's log-count does.
  return _pooled_dense(q, k, v, averaging, allowed, np.zeros(allowed.shape))


@functools.lru_cache(maxsize=None)
def _hierarchical_structure(length, b, causal, seg_bytes, seg_shape):
  seg = np.frombuffer(seg_bytes, dtype=np.int64).reshape(seg_shape)
  batch = seg.shape[0]
  levels = 0
  while 2 * b * 2 ** levels < length:
    levels += 1

  def region(i, level):
    w = b * 2 ** level
    n = i // w
    return set(range(max(0, (n - 1) * w), min(length, (n + 2) * w)))

  averaging = np.zeros((batch, length, length, length))
  allowed = np.zeros((batch, length, length), bool)
  for bi in range(batch):
    for i in range(length):
      covered = set()
      for level in range(levels + 1):
        f = 2 ** level
        ring = sorted(region(i, level) - covered)
        covered |= region(i, level)
        for j in ring:
          if seg[bi, i] != seg[bi, j]:
            continue
          group_end = j // f * f + f - 1
          if causal and (j > i if level == 0 else group_end > i):
            continue
          group = [t for t in range(j // f * f, min(group_end + 1, length))
                   if seg[bi, t] == seg[bi, i]]
          allowed[bi, i, j] = True
          averaging[bi, i, j, group] = 1.0 / len(group)
  return averaging, allowed


def transient_global(q, k, v, *, radius, block_size, causal, segment_ids=None):
  """Local window plus one summary key per block (mean over the query's segment)."""
  batch, length = q.shape[:2]
  seg = _segments(segment_ids, batch, length)
  averaging, allowed = _transient_global_structure(length, radius, block_size, causal,
                                                   seg.tobytes(), seg.shape)
  return _pooled_dense(q, k, v, averaging, allowed, np.zeros(allowed.shape))


@functools.lru_cache(maxsize=None)
def _transient_global_structure(length, radius, block_size, causal, seg_bytes, seg_shape):
  seg = np.frombuffer(seg_bytes, dtype=np.int64).reshape(seg_shape)
  batch = seg.shape[0]
  blocks = -(-length // block_size)
  n_keys = length + blocks
  averaging = np.zeros((batch, length, n_keys, length))
  allowed = np.zeros((batch, length, n_keys), bool)
  for bi in range(batch):
    for i in range(length):
      for j in range(length):
        ok = seg[bi, i] == seg[bi, j] and abs(i - j) <= radius and (not causal or j <= i)
        allowed[bi, i, j] = ok
        averaging[bi, i, j, j] = 1.0
      for c in range(blocks):
        members = [t for t in range(c * block_size, min((c + 1) * block_size, length))
                   if seg[bi, t] == seg[bi, i]]
        if not members or (causal and (c + 1) * block_size > i):
          continue
        allowed[bi, i, length + c] = True
        averaging[bi, i, length + c, members] = 1.0 / len(members)
  return averaging, allowed
