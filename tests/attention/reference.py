"""Dense masked references for the attention kernels, written from the definitions.

Each builds the full [length, length] picture of who attends to what (and,
for pooled keys, which tokens each key averages) with plain numpy loops, then
evaluates one dense softmax in jax so gradients can be compared. They share
no code with longjax.attention.
"""
import functools
import math

import jax
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


def segment_positions(batch, length, segment_ids=None):
  """[batch, length]: each token's position in its segment (a run of equal ids)."""
  seg = _segments(segment_ids, batch, length)
  out = np.zeros((batch, length), np.int64)
  for bi in range(batch):
    for i in range(1, length):
      out[bi, i] = out[bi, i - 1] + 1 if seg[bi, i] == seg[bi, i - 1] else 0
  return out


def mask_chunked(batch, length, *, block_size, causal, segment_ids=None):
  """Chunks of block_size counted from each segment's start."""
  allowed = mask_full(batch, length, length, causal=causal, segment_ids=segment_ids)
  chunk = segment_positions(batch, length, segment_ids) // block_size
  return allowed & (chunk[:, None, :, None] == chunk[:, None, None, :])


def global_tokens(batch, length, *, num_global, segment_ids=None, marked=None):
  """[batch, length] bool: each segment's first num_global tokens (or, with
  `marked`, its first num_global marked tokens), counted from the segment start."""
  seg = _segments(segment_ids, batch, length)
  marked = np.ones((batch, length), bool) if marked is None else np.asarray(marked, bool)
  out = np.zeros((batch, length), bool)
  for bi in range(batch):
    count = 0
    for i in range(length):
      if i == 0 or seg[bi, i] != seg[bi, i - 1]:
        count = 0
      if marked[bi, i]:
        out[bi, i] = count < num_global
        count += 1
  return out


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


def multiresolution(q, k, v, *, block_size, causal, segment_ids=None):
  """Multiresolution attention (each token's own query against the coarse keys
  of its nested regions) from its definition, token by token."""
  batch, length = q.shape[:2]
  seg = _segments(segment_ids, batch, length)
  averaging, allowed = _multiresolution_structure(length, block_size, causal, seg.tobytes(),
                                               seg.shape)
  # Every token j of a coarse group carries the group mean: the group then
  # weighs len(group) in the softmax, as the kernel's log-count does.
  return _pooled_dense(q, k, v, averaging, allowed, np.zeros(allowed.shape))


@functools.lru_cache(maxsize=None)
def _multiresolution_structure(length, b, causal, seg_bytes, seg_shape):
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


def _runs(seg_row):
  """[(start, end)] of the runs of equal ids in one row."""
  starts = [0] + [i for i in range(1, len(seg_row)) if seg_row[i] != seg_row[i - 1]]
  return list(zip(starts, starts[1:] + [len(seg_row)]))


def _h1d_block_mask(n_coarse, b, level, causal):
  """flaxformer's attention blocks at one level, as a dense [n, n] bool matrix.

  Blocks of b coarse tokens; block row N holds the ANCHOR (N, N) at level 0
  (tril when causal), LEFT (N, N - 1) and, bidirectionally, RIGHT (N, N + 1).
  At levels >= 1 LEFT and RIGHT carry the correction mask (flaxformer
  `_gen_correction_mask`): left_block[:b/2, b/2:] = 0, right_block[b/2:, :b/2] = 0.
  """
  half = b // 2
  blocks = -(-n_coarse // b)
  anchor = np.tril(np.ones((b, b), bool)) if causal else np.ones((b, b), bool)
  left = np.ones((b, b), bool)
  right = np.ones((b, b), bool)
  if level > 0:
    left[:half, half:] = False
    right[half:, :half] = False
  full = np.zeros((blocks * b, blocks * b), bool)
  for row in range(blocks):
    at = lambda col: (slice(row * b, row * b + b), slice(col * b, col * b + b))
    if level == 0:
      full[at(row)] = anchor
    if row >= 1:
      full[at(row - 1)] = left
    if not causal and row + 1 < blocks:
      full[at(row + 1)] = right
  return full[:n_coarse, :n_coarse]


def _h1d_segment(q, k, v, b, causal, bias_fn):
  """One segment alone: q [n, heads, d] (scaled), k, v [n, heads, d]."""
  n = q.shape[0]
  m = 1  # flaxformer: the length padded to b * 2^m, num_level = m
  while b * 2 ** m < n:
    m += 1
  levels = []
  for level in range(m):
    f = 2 ** level
    nc = -(-n // f)
    member = np.zeros((nc, n), np.float32)  # token t in coarse token c
    for c in range(nc):
      member[c, c * f:min((c + 1) * f, n)] = 1.0
    count = member.sum(axis=1)
    average = jnp.asarray(member / count[:, None])
    key = jnp.einsum('ct,thd->chd', average, k)                       # coarse keys: mean
    value = jnp.einsum('ct,thd->chd', jnp.asarray(member), v)           # coarse values: sum
    if causal:
      query = q[::f][:nc]                                             # first position of the group
    else:
      query = jnp.einsum('ct,thd->chd', average, q)                   # mean
    s = jnp.einsum('phd,chd->hpc', query, key)
    if bias_fn is not None:
      rel = (np.arange(nc)[:, None] - np.arange(nc)[None, :]) * f
      s = s + jnp.moveaxis(jnp.asarray(bias_fn(jnp.asarray(rel)), jnp.float32), -1, 0)
    levels.append((f, s, _h1d_block_mask(nc, b, level, causal), value, count))
  # One offset per head for every level (flaxformer SCAN_ALL), then exp.
  offset = jnp.max(jnp.stack([jnp.max(jnp.where(mask, s, -jnp.inf), axis=(1, 2))
                              for _, s, mask, _, _ in levels]), axis=0)
  offset = jax.lax.stop_gradient(offset)[:, None, None]
  numerator, denominator = 0.0, 0.0
  for f, s, mask, value, count in levels:
    a = jnp.where(mask, jnp.exp(s - offset), 0.0)
    y = jnp.einsum('hpc,chd->phd', a, value)
    z = jnp.einsum('hpc,c->ph', a, jnp.asarray(count))
    # Piecewise-constant interpolation: every coarse row to its f tokens.
    numerator = numerator + jnp.repeat(y, f, axis=0)[:n]
    denominator = denominator + jnp.repeat(z, f, axis=0)[:n]
  return numerator / denominator[..., None]


def h_transformer_1d(q, k, v, *, block_size, causal, segment_ids=None, bias_fn=None,
                     scale=None):
  """H-Transformer-1D (Zhu & Soricut 2021) as flaxformer's h_attention computes it.

  Every segment (run of equal ids) alone: per level dense coarse scores
  between coarse queries (mean, or causally the group's first query) and
  coarse keys (mean), masked by flaxformer's block structure, exp'd, times
  summed coarse values (numerator) and group sizes (denominator), each
  interpolated to the tokens and summed over levels, then divided.
  bias_fn(rel) -> [..., heads]: rel = i - j at level 0, (p - c) * 2^l above.
  """
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  batch, length, heads, d = q.shape
  k, v = _expand_kv(k, heads), _expand_kv(v, heads)
  q = q * (1 / math.sqrt(d) if scale is None else scale)
  seg = _segments(segment_ids, batch, length)
  rows = []
  for bi in range(batch):
    rows.append(jnp.concatenate([
        _h1d_segment(q[bi, a:e], k[bi, a:e], v[bi, a:e], block_size, causal, bias_fn)
        for a, e in _runs(seg[bi])], axis=0))
  return jnp.stack(rows)


def tglobal_slots(segment_ids, batch, length, block_size, causal):
  """LongT5's summary slots, from the definition: per row, segment by segment
  (runs of equal ids) and block by block, one slot per full block of the
  segment, numbered in that order. Returns (slots [b] lists of (segment run,
  block), query_block [b, l]: the block a query counts as its own (bidirectional:
  orphans of a trailing partial block join the last full block, -1 if the
  segment has none; causal: position // block_size))."""
  seg = _segments(segment_ids, batch, length)
  slots = [[] for _ in range(batch)]
  query_block = np.full((batch, length), -1)
  run_of = np.zeros((batch, length), np.int64)
  for bi in range(batch):
    starts = [0] + [i for i in range(1, length) if seg[bi, i] != seg[bi, i - 1]]
    for run, st in enumerate(starts):
      end = starts[run + 1] if run + 1 < len(starts) else length
      full = (end - st) // block_size
      slots[bi] += [(run, c) for c in range(full)]
      for i in range(st, end):
        run_of[bi, i] = run
        p = i - st
        query_block[bi, i] = p // block_size if causal else min(p // block_size, full - 1)
  return slots, query_block, run_of


def transient_global(q, k, v, summary_k, summary_v, *, radius, block_size, causal,
                     segment_ids=None, bias=None, summary_bias=None):
  """Local window plus the given summary keys/values of the segment's blocks, in one softmax.

  bias: [heads, l, l] on token keys; summary_bias(query_block - block) -> [heads].
  """
  batch, length, heads = q.shape[:3]
  seg = _segments(segment_ids, batch, length)
  slots, query_block, run_of = tglobal_slots(segment_ids, batch, length, block_size, causal)
  g = summary_k.shape[1]
  allowed = np.zeros((batch, 1, length, length + g), bool)
  extra = np.zeros((batch, heads, length, length + g), np.float32)
  for bi in range(batch):
    starts = {}
    for i in range(length):
      starts.setdefault(run_of[bi, i], i)
    for i in range(length):
      for j in range(length):
        allowed[bi, 0, i, j] = (seg[bi, i] == seg[bi, j] and abs(i - j) <= radius
                                and (not causal or j <= i))
      p = i - starts[run_of[bi, i]]
      for s, (run, c) in enumerate(slots[bi]):
        if run != run_of[bi, i] or query_block[bi, i] < 0:
          continue
        if causal and (c + 1) * block_size > p:
          continue
        allowed[bi, 0, i, length + s] = True
        if summary_bias is not None:
          extra[bi, :, i, length + s] = summary_bias(query_block[bi, i] - c)
  if bias is not None:
    extra[:, :, :, :length] += np.asarray(bias)
  keys = jnp.concatenate([jnp.asarray(k, jnp.float32), jnp.asarray(summary_k, jnp.float32)], 1)
  values = jnp.concatenate([jnp.asarray(v, jnp.float32),
                            jnp.asarray(summary_v, jnp.float32)], 1)
  return dense(q, keys, values, allowed, bias=jnp.asarray(extra))
