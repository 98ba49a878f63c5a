"""Ring attention (Liu, Zaharia & Abbeel 2023) for full attention over sequence shards.

With the length split over mesh axis `sequence` into n shards, every shard
keeps its queries and passes its keys, values, key segment ids and key
positions around the ring (lax.ppermute i -> i + 1), n steps in all. Each step
scores the local queries against the visiting block and folds it into the
flash-attention statistics (max, sum, out) exactly (FlashAttention's online
softmax, Rabe & Staats 2021); a block wholly above the causal diagonal is
skipped. No device ever holds more than two shards' keys and values, where
GSPMD's all-gather gives each device the whole sequence's.

The backward (custom_vjp) rotates (k, v, dk, dv) once more around the ring,
recomputing the probabilities from the saved log-sum-exp, so the key
gradients arrive home after n steps. Memory per step is O((L/n)^2) scores.

Not done: the zigzag layout that balances causal work across shards (shard i
holding chunks i and 2n-1-i) needs the data pipeline to permute tokens; with
contiguous shards the last shard does n times the first one's causal work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax import sharding
from longjax.attention import _core

AXIS = 'sequence'


def _rotate(tree, n):
  pairs = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, pairs), tree)


def _visible(q_pos, k_pos, q_seg, k_seg, causal):
  """[b, 1, 1, q, k]: same segment and (causal) key not after the query."""
  mask = q_seg[:, :, None] == k_seg[:, None, :]
  if causal:
    mask = mask & (q_pos[:, :, None] >= k_pos[:, None, :])
  return mask[:, None, None]


def _block_needed(q_pos, k_pos, causal):
  return jnp.min(k_pos) <= jnp.max(q_pos) if causal else jnp.asarray(True)


def _scores(q, k):
  return jnp.einsum('bhgqd,bhkd->bhgqk', q, k, preferred_element_type=jnp.float32)


def _forward(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n):
  b, hk, g, lq, d = q.shape
  start = (jnp.full((b, hk, g, lq), _core.MASK_VALUE, jnp.float32),
           jnp.zeros((b, hk, g, lq), jnp.float32), jnp.zeros((b, hk, g, lq, d), jnp.float32))

  def step(carry, _):
    stats, block = carry
    k_b, v_b, seg_b, pos_b = block

    def fold(m, l, o):
      mask = _visible(q_pos, pos_b, q_seg, seg_b, causal)
      s = jnp.where(mask, _scores(q, k_b), _core.MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      o = o * correction[..., None] + jnp.einsum('bhgqk,bhkd->bhgqd', p.astype(v_b.dtype), v_b,
                                                 preferred_element_type=jnp.float32)
      return m_new, l * correction + jnp.sum(p, axis=-1), o

    stats = jax.lax.cond(_block_needed(q_pos, pos_b, causal), fold, lambda *s: s, *stats)
    return (stats, _rotate(block, n)), None

  ((m, l, o), _), _ = jax.lax.scan(step, (start, (k, v, k_seg, k_pos)), None, length=n)
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  return (o / safe[..., None]).astype(q.dtype), jnp.where(seen, m + jnp.log(safe), jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ring(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n):
  return _forward(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n)[0]


def _ring_fwd(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n):
  out, lse = _forward(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n)
  return out, (q, k, v, q_seg, k_seg, q_pos, k_pos, out, lse)


def _ring_bwd(causal, n, residuals, d_out):
  q, k, v, q_seg, k_seg, q_pos, k_pos, out, lse = residuals
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # FlashAttention-2's D_i

  def step(carry, _):
    dq, block = carry
    k_b, v_b, seg_b, pos_b, dk_b, dv_b = block

    def accumulate(dq, dk_b, dv_b):
      mask = _visible(q_pos, pos_b, q_seg, seg_b, causal)
      p = jnp.where(mask, jnp.exp(_scores(q, k_b) - lse[..., None]), 0.0)
      dv_b = dv_b + jnp.einsum('bhgqk,bhgqd->bhkd', p, d_out)
      ds = p * (jnp.einsum('bhgqd,bhkd->bhgqk', d_out, v_b.astype(jnp.float32))
                - delta[..., None])
      dq = dq + jnp.einsum('bhgqk,bhkd->bhgqd', ds, k_b.astype(jnp.float32))
      dk_b = dk_b + jnp.einsum('bhgqk,bhgqd->bhkd', ds, q.astype(jnp.float32))
      return dq, dk_b, dv_b

    dq, dk_b, dv_b = jax.lax.cond(_block_needed(q_pos, pos_b, causal), accumulate,
                                  lambda *a: a, dq, dk_b, dv_b)
    return (dq, _rotate((k_b, v_b, seg_b, pos_b, dk_b, dv_b), n)), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  # n rotations bring every key block, with its gradients, back to its shard.
  (dq, (_, _, _, _, dk, dv)), _ = jax.lax.scan(
      step, (zeros(q), (k, v, k_seg, k_pos, zeros(k), zeros(v))), None, length=n)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(qh, kh, vh, *, causal: bool, segment_ids=None):
  """Self-attention over all keys with the length sharded over `sequence`.

  qh: [b, kv_heads, group, l, d], scaled; kh, vh: [b, kv_heads, l, d]; inside
  `sharding.axis_rules` with mesh.sequence > 1 (contiguous shards). Returns
  [b, l, heads, d] in qh's dtype.
  """
  n = sharding.mesh_axis_size(AXIS)
  b, _, _, length, _ = qh.shape
  if segment_ids is None:
    segment_ids = jnp.zeros((b, length), jnp.int32)

  def run(q, k, v, seg):
    shard = q.shape[3]
    pos = jax.lax.axis_index(AXIS) * shard + jnp.arange(shard, dtype=jnp.int32)
    pos = jnp.broadcast_to(pos, seg.shape)
    return _ring(q, k, v, seg, seg, pos, pos, causal, n)

  q_names = ('batch', 'kv_heads', None, 'length', None)
  kv_names = ('batch', 'kv_heads', 'length', None)
  out = sharding.per_shard(run, (qh, kh, vh, segment_ids.astype(jnp.int32)),
                           (q_names, kv_names, kv_names, ('batch', 'length')),
                           [(q_names, qh.shape)])
  b, hk, g, l, d = out.shape
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, l, hk * g, d)
