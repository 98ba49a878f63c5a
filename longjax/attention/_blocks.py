"""One softmax part over blocked keys, with a backward that recomputes its scores.

Every XLA kernel of this package (local windows, global tokens, TGlobal
summaries, hierarchical levels, multiresolution blocks, dense) computes its
parts here. Left to autodiff, a part saves its float32 score and probability
tiles for the backward pass: [batch, heads, queries, keys per query], O(L r)
for a window of r keys and O(L (r + g)) with g global keys, the largest
activation of a long-context layer (170 KB per token at 64k in the first
wave's local LM). FlashAttention's backward (Dao et al. 2022, Alg. 4) instead
saves only what is O(L d) and recomputes the tiles from q and k. This part's
custom VJP does the same: it saves its inputs (q, the blocked keys and
values, the mask and additive terms, which exist anyway) and nothing of
size [queries, keys].

The deviation from FlashAttention's saved state: a part returns unnormalised
statistics (max m, sum l, output o; see `_core`) and is normalised by
`_core.merge` with the other parts, so the backward of the normalisation is
merge's (autodiff, O(L d)) and this VJP is that of the unnormalised sums.
With P = w exp(s - m) (m held constant, as the forward's stop_gradient does;
the merged output does not depend on it):

    l = sum_k P,   o = sum_k P v,
    dP = dl + do . v,   dv = P^T do,   ds = P * dP,
    dq = ds k,   dk = ds^T q,   dbias = dlog_weight = ds,   dw = exp(s - m) dP,

each term summed over the axes its input was broadcast along. Exactly
autodiff's gradients (to float rounding; tested to 1e-5 in fp32).

Both passes also run over chunks of the blocks when a part's score tiles
would exceed CHUNK_SCORES elements (`lax.scan` over strided chunks of the
block axis, or of the query rows when there is one block), so the transient
tiles are bounded too: a 1M-token window part holds 64 MiB of scores at a
time instead of gigabytes.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from longjax.attention import _core

# Score elements one chunk of blocks may hold at once (2^24 float32 = 64 MiB).
CHUNK_SCORES = 1 << 24


@contextlib.contextmanager
def one_chunk():
  """Traces every part as one chunk, for XLA's cost analysis, which counts a
  loop's body once rather than once per trip (experiments.budget's FLOPs). What
  is traced inside is for analysis only: at long lengths it would not fit."""
  global CHUNK_SCORES
  saved, CHUNK_SCORES = CHUNK_SCORES, float('inf')
  try:
    yield
  finally:
    CHUNK_SCORES = saved

_EXTRAS = ('mask', 'bias', 'log_weight', 'weight')


class _Plan(NamedTuple):
  axis: Optional[int]   # 2 (blocks) or 4 (query rows) of [b, hk, n, g, tq, tk]; None: one chunk
  chunks: int


def attend_blocks(q, k, v, *, mask, bias=None, log_weight=None, weight=None) -> _core.Part:
  """One part over blocked keys: each block of queries attends its block of keys.

  Args:
    q: [b, kv_heads, n, group, tq, d], already multiplied by the softmax scale.
    k, v: [b, kv_heads, n, tk, d].
    mask: bool, broadcastable to [b, kv_heads, n, group, tq, tk].
    bias: additive f32, broadcastable like mask.
    log_weight: additive f32 per key, broadcastable like mask (e.g. the log of
      how many tokens a pooled key stands for).
    weight: multiplicative f32 (adaptive span's soft mask), broadcastable like
      mask; keys with weight 0 must also be masked.
  Returns:
    A Part with queries flattened block-major: [b, kv_heads, group, n * tq(, d)].
  """
  b, hk, n, g, tq, d = q.shape
  tk = k.shape[3]
  six = lambda x: None if x is None else jnp.reshape(x, (1,) * (6 - x.ndim) + x.shape)
  extras = {name: six(x) for name, x in zip(_EXTRAS, (mask, bias, log_weight, weight))}
  row_max, row_sum, out = _attend(_plan(b * hk * n * g * tq * tk, n, tq), q, k, v, extras)
  rows = lambda x: jnp.swapaxes(x, 2, 3).reshape(b, hk, g, n * tq)
  return _core.Part(rows(row_max), rows(row_sum),
                    jnp.swapaxes(out, 2, 3).reshape(b, hk, g, n * tq, d))


def _plan(elements: int, n: int, tq: int) -> _Plan:
  """Chunks along the blocks (or, with too few blocks, the query rows)."""
  need = math.ceil(elements / CHUNK_SCORES)
  if need <= 1:
    return _Plan(None, 1)
  for axis, size in ((2, n), (4, tq)):
    for chunks in range(need, size + 1):
      if size % chunks == 0:
        return _Plan(axis, chunks)
  return _Plan(2, n) if n > 1 else _Plan(4, tq)


# ----------------------------------------------------------------------------
# One chunk: the forward statistics and the backward sums.

def _scores(q, k, extras):
  s = jnp.einsum('bhngqd,bhnkd->bhngqk', q, k, preferred_element_type=jnp.float32)
  for name in ('bias', 'log_weight'):
    if extras[name] is not None:
      s = s + extras[name]
  return s


def _forward_chunk(q, k, v, extras):
  row_max, probs, row_sum = _core.softmax_stats(_scores(q, k, extras), extras['mask'],
                                                extras['weight'])
  out = jnp.einsum('bhngqk,bhnkd->bhngqd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return row_max, row_sum, out


def _backward_chunk(q, k, v, extras, d_sum, d_out):
  """Cotangents of (q, k, v, extras) given those of (sum, out); see the module doc."""
  scores = jnp.where(extras['mask'], _scores(q, k, extras), _core.MASK_VALUE)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  shift = jnp.where(row_max > _core.MASK_VALUE / 2, row_max, 0.0)
  exps = jnp.exp(scores - shift)
  probs = exps if extras['weight'] is None else exps * extras['weight']
  d_probs = d_sum[..., None] + jnp.einsum('bhngqd,bhnkd->bhngqk', d_out.astype(v.dtype), v,
                                          preferred_element_type=jnp.float32)
  d_scores = probs * d_probs
  dv = jnp.einsum('bhngqk,bhngqd->bhnkd', probs.astype(v.dtype), d_out.astype(v.dtype),
                  preferred_element_type=jnp.float32)
  dq = jnp.einsum('bhngqk,bhnkd->bhngqd', d_scores.astype(k.dtype), k,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum('bhngqk,bhngqd->bhnkd', d_scores.astype(q.dtype), q,
                  preferred_element_type=jnp.float32)
  d_extras = {'mask': None}
  for name in ('bias', 'log_weight'):
    x = extras[name]
    d_extras[name] = None if x is None else _reduce_to(d_scores, x)
  x = extras['weight']
  d_extras['weight'] = None if x is None else _reduce_to(exps * d_probs, x)
  return _reduce_to(dq, q), _reduce_to(dk, k), _reduce_to(dv, v), d_extras


def _reduce_to(grad, like):
  """grad summed over the axes `like` was broadcast along (same rank), in like's dtype."""
  axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, like.shape)) if s == 1 and g != 1)
  return jnp.sum(grad, axis=axes, keepdims=True).astype(like.dtype)


# ----------------------------------------------------------------------------
# Chunking: which operands split along the chunk axis, which are shared.

def _split_axes(plan: _Plan, q, k, v, extras):
  """The axis each operand splits along (None: shared by every chunk)."""
  axis = plan.axis
  size = q.shape[axis]
  split = lambda x: None if x is None or x.shape[axis] != size else axis
  kv_axis = axis if axis == 2 and k.shape[2] == size else None
  return (axis, kv_axis, kv_axis, {name: split(x) for name, x in extras.items()})


def _split(x, axis, chunks):
  """[.., size, ..] -> [chunks, .., size / chunks, ..]; chunk c holds entries c, c + chunks, ..."""
  if x is None or axis is None:
    return x
  shape = x.shape[:axis] + (x.shape[axis] // chunks, chunks) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis + 1, 0)


def _unsplit(y, axis):
  """The inverse of _split."""
  y = jnp.moveaxis(y, 0, axis + 1)
  return y.reshape(y.shape[:axis] + (y.shape[axis] * y.shape[axis + 1],) + y.shape[axis + 2:])


def _chunked(plan, q, k, v, extras):
  """(chunked operands, shared operands) as two (q, k, v, extras) tuples, None where absent."""
  axes = _split_axes(plan, q, k, v, extras)
  chunked, shared = [], []
  for x, axis in zip((q, k, v), axes[:3]):
    chunked.append(None if axis is None else _split(x, axis, plan.chunks))
    shared.append(x if axis is None else None)
  chunked.append({n: None if axes[3][n] is None else _split(x, axes[3][n], plan.chunks)
                  for n, x in extras.items()})
  shared.append({n: x if axes[3][n] is None else None for n, x in extras.items()})
  return tuple(chunked), tuple(shared), axes


def _pick(chunked, shared):
  """One chunk's operands: the chunked where present, else the shared."""
  pick = lambda c, s: s if c is None else c
  q, k, v = (pick(c, s) for c, s in zip(chunked[:3], shared[:3]))
  return q, k, v, {n: pick(chunked[3][n], shared[3][n]) for n in _EXTRAS}


def _run_forward(plan: _Plan, q, k, v, extras):
  if plan.axis is None:
    return _forward_chunk(q, k, v, extras)
  chunked, shared, _ = _chunked(plan, q, k, v, extras)
  stats = jax.lax.map(lambda c: _forward_chunk(*_pick(c, shared)), chunked)
  return tuple(_unsplit(y, plan.axis) for y in stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: _Plan, q, k, v, extras):
  return _run_forward(plan, q, k, v, extras)


def _attend_fwd(plan, q, k, v, extras):
  return _run_forward(plan, q, k, v, extras), (q, k, v, extras)


def _attend_bwd(plan, saved, cotangents):
  _, d_sum, d_out = cotangents  # the max is held constant (stop_gradient in the forward)
  # The barrier ties the recomputation to the cotangents: without it XLA's
  # CSE merges the backward's score matmul with the forward's and keeps the
  # forward's tiles alive after all (as jax.checkpoint's barrier prevents).
  (q, k, v, extras), d_sum, d_out = jax.lax.optimization_barrier((saved, d_sum, d_out))
  if plan.axis is None:
    return _backward_chunk(q, k, v, extras, d_sum, d_out)
  chunked, shared, axes = _chunked(plan, q, k, v, extras)
  d_sum, d_out = (_split(x, plan.axis, plan.chunks) for x in (d_sum, d_out))
  shared_grads = lambda grads: (  # the cotangents of the shared operands
      [g if a is None else None for g, a in zip(grads[:3], axes[:3])],
      {n: g if axes[3][n] is None else None for n, g in grads[3].items()})
  no_mask = dict(extras, mask=None)
  zero = jax.tree.map(jnp.zeros_like, shared_grads((q, k, v, no_mask)))

  def step(total, xs):
    grads = _backward_chunk(*_pick(xs[0], shared), xs[1], xs[2])
    add = shared_grads(grads)
    total = jax.tree.map(jnp.add, total, add)
    own = ([g if a is not None else None for g, a in zip(grads[:3], axes[:3])],
           {n: g if axes[3][n] is not None else None for n, g in grads[3].items()})
    return total, own

  total, own = jax.lax.scan(step, zero, (chunked, d_sum, d_out))
  grads = [t if o is None else _unsplit(o, a) for t, o, a in zip(total[0], own[0], axes[:3])]
  d_extras = {n: total[1][n] if own[1][n] is None else _unsplit(own[1][n], axes[3][n])
              for n in _EXTRAS}
  d_extras['mask'] = None
  return (*grads, d_extras)


_attend.defvjp(_attend_fwd, _attend_bwd)
