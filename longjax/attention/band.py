"""The accelerator kernels as parts of longjax's kernels: band masks in, Parts out.

`full`, `local`, `chunked` and `global_local` are, for the fused kernels, one
mask family: key j is visible to query i iff -right <= i - j <= left (None: no
limit), j <= i when causal, the segments match, or j is a global key of the
query's segment (see longjax.attention.pallas_gpu.Band). This module takes the
heads-major, scaled queries every longjax kernel starts from, runs splash
(TPU) or longjax's Pallas GPU kernel on each device's shard of the batch and
heads, and returns either the output or a `_core.Part` that merges exactly
with the kind's other parts.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from longjax import sharding
from longjax.attention import _core, pallas_gpu, splash
from longjax.attention.implementations import Choice

_Q_NAMES = ('batch', 'heads', None, None)
_KV_NAMES = ('batch', 'kv_heads', None, None)
_ROW_NAMES = ('batch', None)


def _names(q, k):
  """Logical names for the kernels' operands; heads stay whole unless both the
  query and the key/value heads split evenly (a kernel maps query head h to
  key head h // group, which a shard must keep)."""
  q_spec, k_spec = sharding.spec_for(_Q_NAMES, q.shape), sharding.spec_for(_KV_NAMES, k.shape)
  if q_spec is not None and q_spec[1] != k_spec[1]:
    return ('batch', None, None, None), ('batch', None, None, None)
  return _Q_NAMES, _KV_NAMES


def _flat_heads(qh):
  """[b, kv_heads, group, l, d] -> [b, heads, l, d] (query head = kv_head * group + g)."""
  b, hk, g, l, d = qh.shape
  return qh.reshape(b, hk * g, l, d)


def _token_major(out):
  """[b, heads, l, d] -> [b, l, heads, d]."""
  return jnp.transpose(out, (0, 2, 1, 3))


def output(choice: Choice, qh, kh, vh, *, left: Optional[int], right: Optional[int],
           causal: bool, segment_ids=None, global_columns: int = 0, dtype=None):
  """The attention output [b, l, heads, d] of a band mask (self-attention).

  qh: [b, kv_heads, group, l, d], scaled; kh, vh: [b, kv_heads, l, d].
  global_columns: the first keys every query sees (splash only; prefix globals
  of an unsegmented row).
  """
  q = _flat_heads(qh)
  dtype = dtype or q.dtype
  if sharding.mesh_axis_size('sequence') > 1:
    return _token_major(_halo_output(choice, q, kh, vh, left=left, right=right, causal=causal,
                                     segment_ids=segment_ids, dtype=dtype,
                                     global_columns=global_columns).astype(dtype))
  q_names, kv_names = _names(q, kh)
  if choice.name == 'splash':
    def run(q, k, v, segment_ids):
      return splash.attend(q, k, v, left=left, right=right, causal=causal,
                           segment_ids=segment_ids, global_columns=global_columns,
                           interpret=choice.interpret)
    out = sharding.per_shard(run, (q, kh, vh, segment_ids),
                             (q_names, kv_names, kv_names, _ROW_NAMES), [(q_names, q.shape)])
  else:
    if global_columns:
      raise ValueError('global_columns is a splash mask; pallas_gpu takes key_global.')
    out, _ = _pallas_gpu(choice, q, kh, vh, pallas_gpu.Band(left, right, causal),
                         segment_ids=segment_ids, kv_segment_ids=segment_ids, key_global=None,
                         out_dtype=dtype)
  return _token_major(out.astype(dtype))


def _halo_output(choice, q, k, v, *, left, right, causal, segment_ids, dtype, global_columns):
  """The band kernel on a sequence-sharded input: each shard receives the last
  `left` keys, values and segment ids of its left neighbour (and the first
  `right` of its right one) by ppermute, and runs the kernel on its queries
  against [left halo | own keys | right halo]. The backward is ppermute's
  transpose: the halo's gradients travel back to the shard that owns them."""
  if left is None or right is None:
    raise ValueError('a sequence-sharded band needs a bounded window (left and right).')
  if global_columns:
    raise ValueError('global_columns are the row prefix, which only the first sequence shard '
                     'holds; sequence-sharded global_local takes the xla path.')
  n = sharding.mesh_axis_size('sequence')
  q_names, kv_names = _names(q, k)
  q_names, kv_names = q_names[:2] + ('length', None), kv_names[:2] + ('length', None)
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:1] + q.shape[2:3], jnp.int32)
  shard_len = q.shape[2] // n
  if q.shape[2] % n or max(left, right) > shard_len:
    raise ValueError(
        f'a sequence shard of {q.shape[2]} / mesh.sequence = {n} tokens must hold the window '
        f'({left} left, {right} right): shorten the window or use fewer sequence shards.')

  def shifted(x, amount, axis, direction):
    """What shard i receives: x's last (direction +1) or first (-1) `amount`
    positions on shard i - direction; zeros where there is no such shard."""
    size = x.shape[axis]
    piece = jax.lax.slice_in_dim(x, size - amount, size, axis=axis) if direction > 0 else \
        jax.lax.slice_in_dim(x, 0, amount, axis=axis)
    pairs = [(i, i + direction) for i in range(n) if 0 <= i + direction < n]
    return jax.lax.ppermute(piece, 'sequence', pairs)

  def halo(x, ids, amount, direction, axis):
    """(x's halo, its segment ids): padding ids where there is no neighbour."""
    source = jax.lax.axis_index('sequence') - direction  # the shard it comes from
    exists = (source >= 0) & (source < n)
    halo_ids = jnp.where(exists, shifted(ids, amount, 1, direction),
                         jnp.iinfo(jnp.int32).min + 2)
    return [shifted(y, amount, axis, direction) for y in x], halo_ids

  def run(q, k, v, ids):
    keys, values, kv_ids = [k], [v], [ids]
    if left:
      (k_left, v_left), ids_left = halo((k, v), ids, left, 1, 2)
      keys.insert(0, k_left), values.insert(0, v_left), kv_ids.insert(0, ids_left)
    if right:
      (k_right, v_right), ids_right = halo((k, v), ids, right, -1, 2)
      keys.append(k_right), values.append(v_right), kv_ids.append(ids_right)
    keys, values = jnp.concatenate(keys, 2), jnp.concatenate(values, 2)
    kv_ids = jnp.concatenate(kv_ids, 1)
    if choice.name == 'splash':
      return splash.attend(q, keys, values, left=left, right=right, causal=causal,
                           segment_ids=ids, kv_segment_ids=kv_ids, offset=left,
                           interpret=choice.interpret)
    out, _ = pallas_gpu.attend(q, keys, values, band=pallas_gpu.Band(left, right, causal, left),
                               segment_ids=ids, kv_segment_ids=kv_ids, out_dtype=dtype,
                               interpret=choice.interpret)
    return out

  return sharding.per_shard(run, (q, k, v, segment_ids),
                            (q_names, kv_names, kv_names, ('batch', 'length')),
                            [(q_names, q.shape)])


def cross_output(choice: Choice, qh, kh, vh, *, causal: bool, segment_ids=None,
                 kv_segment_ids=None, dtype=None):
  """Full attention of q_len queries to kv_len keys (pallas_gpu): [b, q_len, heads, d]."""
  q = _flat_heads(qh)
  offset = kh.shape[2] - q.shape[2]  # the queries are the last q_len positions
  band = pallas_gpu.Band(None, 0 if causal else None, causal, offset)
  out, _ = _pallas_gpu(choice, q, kh, vh, band, segment_ids=segment_ids,
                       kv_segment_ids=kv_segment_ids, key_global=None, out_dtype=dtype or q.dtype)
  return _token_major(out)


def part(choice: Choice, qh, kh, vh, *, left: Optional[int], right: Optional[int],
         causal: bool, segment_ids=None, key_global=None) -> _core.Part:
  """The band as a Part (pallas_gpu), to merge with parts for the keys outside
  the key blocks it visits (`pallas_gpu.visited_key_blocks`)."""
  if choice.name != 'pallas_gpu':
    raise ValueError(f'a band Part needs the log-sum-exp; {choice.name!r} does not give one '
                     'differentiably.')
  b, hk, g, l, d = qh.shape
  out, lse = _pallas_gpu(choice, _flat_heads(qh), kh, vh, pallas_gpu.Band(left, right, causal),
                         segment_ids=segment_ids, kv_segment_ids=segment_ids,
                         key_global=key_global, out_dtype=jnp.float32)
  lse = lse.reshape(b, hk, g, l)
  seen = (lse > _core.MASK_VALUE / 2).astype(jnp.float32)
  return _core.Part(lse, seen, out.reshape(b, hk, g, l, d))


def _pallas_gpu(choice, q, k, v, band, *, segment_ids, kv_segment_ids, key_global, out_dtype):
  q_names, kv_names = _names(q, k)

  def run(q, k, v, segment_ids, kv_segment_ids, key_global):
    return pallas_gpu.attend(q, k, v, band=band, segment_ids=segment_ids,
                             kv_segment_ids=kv_segment_ids, key_global=key_global,
                             out_dtype=out_dtype, interpret=choice.interpret)
  lse_shape = q.shape[:3]
  return sharding.per_shard(
      run, (q, k, v, segment_ids, kv_segment_ids, key_global),
      (q_names, kv_names, kv_names, _ROW_NAMES, _ROW_NAMES, _ROW_NAMES),
      [(q_names, q.shape), (q_names[:3], lse_shape)])
