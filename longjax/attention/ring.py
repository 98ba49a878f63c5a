"""Ring attention (Liu, Zaharia & Abbeel 2023) for full attention over sequence shards.

With the length split over mesh axis `sequence` into n shards, every shard
keeps its queries and passes its keys, values, key segment ids and key
positions around the ring (lax.ppermute i -> i + 1), n steps in all. Each step
scores the local queries against the visiting block and folds it into the
flash-attention statistics (max, sum, out) exactly (FlashAttention's online
softmax, Rabe & Staats 2021). No device ever holds more than two shards' keys
and values, where GSPMD's all-gather gives each device the whole sequence's.

Causal load balance, the zigzag layout (ring-flash-attention's zigzag ring;
Llama 3's context parallelism, Dubey et al. 2024): cut the row into 2n chunks and
let shard i hold chunks i and 2n-1-i, one early and one late. Then at a ring
step whose keys come from shard j != i exactly half the work is visible: for
j < i the visiting early chunk against all local queries, for j > i the local
late queries against all visiting keys, and only those halves are computed;
every shard does the same causal work (contiguous shards: the last does n
times the first's). The layout is entered and left inside the attention call
by two ppermutes each way (the chunks are exchanged by parity), so the rest of
the model keeps contiguous shards; it needs the length to divide into 2n
chunks, else the contiguous layout is used (skipping blocks wholly above the
diagonal).

The backward (custom_vjp) rotates (k, v, dk, dv) once more around the ring,
recomputing the probabilities from the saved log-sum-exp, so the key
gradients arrive home after n steps. Memory per step is O((L/n)^2) scores.
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


def _scores(q, k):
  return jnp.einsum('bhgqd,bhkd->bhgqk', q, k, preferred_element_type=jnp.float32)


def _fold(stats, q, q_seg, q_pos, k_b, v_b, seg_b, pos_b, causal):
  """One block of keys folded into the online-softmax statistics of queries q."""
  m, l, o = stats
  mask = _visible(q_pos, pos_b, q_seg, seg_b, causal)
  s = jnp.where(mask, _scores(q, k_b), _core.MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  correction = jnp.exp(m - m_new)
  o = o * correction[..., None] + jnp.einsum('bhgqk,bhkd->bhgqd', p.astype(v_b.dtype), v_b,
                                             preferred_element_type=jnp.float32)
  return m_new, l * correction + jnp.sum(p, axis=-1), o


def _grads(q, q_seg, q_pos, d_out, lse, delta, k_b, v_b, seg_b, pos_b, causal):
  """FlashAttention-2's backward of one (queries, key block) pair: (dq, dk, dv)."""
  mask = _visible(q_pos, pos_b, q_seg, seg_b, causal)
  p = jnp.where(mask, jnp.exp(_scores(q, k_b) - lse[..., None]), 0.0)
  dv = jnp.einsum('bhgqk,bhgqd->bhkd', p, d_out)
  ds = p * (jnp.einsum('bhgqd,bhkd->bhgqk', d_out, v_b.astype(jnp.float32)) - delta[..., None])
  dq = jnp.einsum('bhgqk,bhkd->bhgqd', ds, k_b.astype(jnp.float32))
  dk = jnp.einsum('bhgqk,bhgqd->bhkd', ds, q.astype(jnp.float32))
  return dq, dk, dv


def _case(step, n, causal, zigzag):
  """Which part of a step's (queries, keys) pair is computed: 0 all, 1 the
  visiting block's early half of the keys (zigzag, j < i), 2 the local late
  half of the queries (zigzag, j > i), 3 nothing (contiguous, above the
  diagonal). The keys at `step` come from shard j = i - step (mod n)."""
  i = jax.lax.axis_index(AXIS)
  j = (i - step) % n
  if not causal:
    return jnp.asarray(0)
  if zigzag:
    return jnp.where(j == i, 0, jnp.where(j < i, 1, 2))
  return jnp.where(j <= i, 0, 3)


def _rows(x, lo, hi, axis):
  return jax.lax.slice_in_dim(x, lo, hi, axis=axis)


def _forward(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n, zigzag):
  b, hk, g, lq, d = q.shape
  half = lq // 2
  start = (jnp.full((b, hk, g, lq), _core.MASK_VALUE, jnp.float32),
           jnp.zeros((b, hk, g, lq), jnp.float32), jnp.zeros((b, hk, g, lq, d), jnp.float32))

  def step(carry, t):
    stats, block = carry
    k_b, v_b, seg_b, pos_b = block
    everything = lambda stats: _fold(stats, q, q_seg, q_pos, k_b, v_b, seg_b, pos_b, causal)

    def early_keys(stats):
      return _fold(stats, q, q_seg, q_pos, _rows(k_b, 0, half, 2), _rows(v_b, 0, half, 2),
                   _rows(seg_b, 0, half, 1), _rows(pos_b, 0, half, 1), causal)

    def late_queries(stats):
      late = _fold(tuple(_rows(x, half, lq, 3) for x in stats), _rows(q, half, lq, 3),
                   _rows(q_seg, half, lq, 1), _rows(q_pos, half, lq, 1), k_b, v_b, seg_b, pos_b,
                   causal)
      return tuple(jnp.concatenate([_rows(x, 0, half, 3), y], axis=3)
                   for x, y in zip(stats, late))

    stats = jax.lax.switch(_case(t, n, causal, zigzag),
                           [everything, early_keys, late_queries, lambda stats: stats], stats)
    return (stats, _rotate(block, n)), None

  ((m, l, o), _), _ = jax.lax.scan(step, (start, (k, v, k_seg, k_pos)), jnp.arange(n))
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  return (o / safe[..., None]).astype(q.dtype), jnp.where(seen, m + jnp.log(safe), jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ring(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n, zigzag):
  return _forward(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n, zigzag)[0]


def _ring_fwd(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n, zigzag):
  out, lse = _forward(q, k, v, q_seg, k_seg, q_pos, k_pos, causal, n, zigzag)
  return out, (q, k, v, q_seg, k_seg, q_pos, k_pos, out, lse)


def _ring_bwd(causal, n, zigzag, residuals, d_out):
  q, k, v, q_seg, k_seg, q_pos, k_pos, out, lse = residuals
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # FlashAttention-2's D_i
  lq = q.shape[3]
  half = lq // 2
  queries = (q, q_seg, q_pos, d_out, lse, delta)
  late = lambda: (_rows(q, half, lq, 3), _rows(q_seg, half, lq, 1), _rows(q_pos, half, lq, 1),
                  _rows(d_out, half, lq, 3), _rows(lse, half, lq, 3), _rows(delta, half, lq, 3))

  def step(carry, t):
    dq, block = carry
    k_b, v_b, seg_b, pos_b, dk_b, dv_b = block

    def everything(dq, dk_b, dv_b):
      gq, gk, gv = _grads(*queries, k_b, v_b, seg_b, pos_b, causal)
      return dq + gq, dk_b + gk, dv_b + gv

    def early_keys(dq, dk_b, dv_b):
      gq, gk, gv = _grads(*queries, _rows(k_b, 0, half, 2), _rows(v_b, 0, half, 2),
                          _rows(seg_b, 0, half, 1), _rows(pos_b, 0, half, 1), causal)
      pad = lambda x: _core.pad_axis(x, 2, lq)
      return dq + gq, dk_b + pad(gk), dv_b + pad(gv)

    def late_queries(dq, dk_b, dv_b):
      gq, gk, gv = _grads(*late(), k_b, v_b, seg_b, pos_b, causal)
      return dq + jnp.pad(gq, [(0, 0)] * 3 + [(half, 0), (0, 0)]), dk_b + gk, dv_b + gv

    dq, dk_b, dv_b = jax.lax.switch(_case(t, n, causal, zigzag),
                                    [everything, early_keys, late_queries, lambda *a: a],
                                    dq, dk_b, dv_b)
    return (dq, _rotate((k_b, v_b, seg_b, pos_b, dk_b, dv_b), n)), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  # n rotations bring every key block, with its gradients, back to its shard.
  (dq, (_, _, _, _, dk, dv)), _ = jax.lax.scan(
      step, (zeros(q), (k, v, k_seg, k_pos, zeros(k), zeros(v))), jnp.arange(n))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _by_parity(x, n, axis, to_zigzag: bool):
  """Contiguous shard i (chunks 2i, 2i+1) <-> zigzag shard i (chunks i, 2n-1-i),
  along `axis`, inside shard_map. Each shard holds one even and one odd chunk
  either way, so two ppermutes (one per parity) move them."""
  i = jax.lax.axis_index(AXIS)
  half = x.shape[axis] // 2
  first, second = _rows(x, 0, half, axis), _rows(x, half, 2 * half, axis)
  zig_home = lambda c: c if c < n else 2 * n - 1 - c  # the zigzag shard of chunk c
  if to_zigzag:  # send chunks 2i (even) and 2i + 1 (odd) to their zigzag shards
    even = jax.lax.ppermute(first, AXIS, [(s, zig_home(2 * s)) for s in range(n)])
    odd = jax.lax.ppermute(second, AXIS, [(s, zig_home(2 * s + 1)) for s in range(n)])
    i_even = i % 2 == 0  # then chunk i (early) is the even one
    return jnp.concatenate([jnp.where(i_even, even, odd), jnp.where(i_even, odd, even)], axis)
  # Back: zigzag shard s holds chunk s first; its even chunk goes home to even // 2.
  even_chunk = lambda s: s if s % 2 == 0 else 2 * n - 1 - s
  i_even = i % 2 == 0
  held_even = jnp.where(i_even, first, second)
  held_odd = jnp.where(i_even, second, first)
  even = jax.lax.ppermute(held_even, AXIS, [(s, even_chunk(s) // 2) for s in range(n)])
  odd = jax.lax.ppermute(held_odd, AXIS, [(s, (2 * n - 1 - even_chunk(s)) // 2)
                                          for s in range(n)])
  return jnp.concatenate([even, odd], axis)


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

  zigzag = causal and length % (2 * n) == 0

  def run(q, k, v, seg):
    shard, i = q.shape[3], jax.lax.axis_index(AXIS)
    if not zigzag:
      pos = jnp.broadcast_to(i * shard + jnp.arange(shard, dtype=jnp.int32), seg.shape)
      return _ring(q, k, v, seg, seg, pos, pos, causal, n, False)
    half = shard // 2  # chunks i and 2n-1-i
    pos = jnp.concatenate([i * half + jnp.arange(half, dtype=jnp.int32),
                           (2 * n - 1 - i) * half + jnp.arange(half, dtype=jnp.int32)])
    pos = jnp.broadcast_to(pos, seg.shape)
    there = lambda x, axis: _by_parity(x, n, axis, True)
    q, k, v, seg = there(q, 3), there(k, 2), there(v, 2), there(seg, 1)
    return _by_parity(_ring(q, k, v, seg, seg, pos, pos, causal, n, True), n, 3, False)

  q_names = ('batch', 'kv_heads', None, 'length', None)
  kv_names = ('batch', 'kv_heads', 'length', None)
  out = sharding.per_shard(run, (qh, kh, vh, segment_ids.astype(jnp.int32)),
                           (q_names, kv_names, kv_names, ('batch', 'length')),
                           [(q_names, qh.shape)])
  b, hk, g, l, d = out.shape
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, l, hk * g, d)
