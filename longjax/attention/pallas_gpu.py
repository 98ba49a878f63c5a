"""A block-sparse flash-attention kernel in Pallas (Triton on GPU, interpreted on CPU).

What a query sees (the `Band`): key j is visible to query i, at relative
position rel = (i + offset) - j, iff

    segment_ids[i] == kv_segment_ids[j]                    (when given)
    and rel >= 0                                            (when causal)
    and (-right <= rel <= left  or  key_global[j])          (None: no limit)

`left`/`right` describe local (radius, radius or 0), chunked (chunk_size - 1
over chunk ids), full (None, None) and causal full attention; `key_global`
marks keys (global_local's global tokens) that every query of their segment
sees wherever they are among the key blocks this query block visits.

Sparsity: query block qb visits only the key blocks [lo(qb), hi(qb)) that
the band can reach, computed from program ids; the backward's dK/dV pass
visits exactly the transposed set, so no block the band leaves empty is ever
loaded. Keys outside the visited blocks (far global tokens) are the caller's
to add: the kernel also returns the log-sum-exp, differentiably, so its
result merges exactly with other parts (longjax.attention._core.merge).

Algorithm: FlashAttention-2 (Dao 2023): forward with an online softmax that
stores only O and the log-sum-exp; backward recomputes the probabilities from
them in a dQ pass (over key blocks) and a dK/dV pass (over query blocks, and
over the query heads of each key/value head for grouped-query attention).
Scores, softmax and accumulators are float32; the two matmuls take the input
dtype. Rows that see no key get 0 and a log-sum-exp of MASK_VALUE.

Written with the portable Pallas API (program ids, `pl.ds` slices, `pl.dot`,
loops with traced bounds), like jax.experimental.pallas.ops.gpu.attention, so
the one kernel lowers to Triton for a GPU and runs with interpret=True on CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from longjax.attention._core import MASK_VALUE, pad_axis


class Band(NamedTuple):
  """Static part of the mask (see the module doc); hashable."""
  left: Optional[int]
  right: Optional[int]
  causal: bool
  offset: int = 0  # query i sits at key position i + offset (causal cross-attention)


def _tiling(q_len: int, kv_len: int, head_dim: int) -> tuple[int, int]:
  """(block, padded head_dim): Triton wants power-of-two tiles. 128 x 128 tiles
  with head_dim <= 128 fit an SM's shared memory in bf16 with two pipeline
  stages; head_dim 256 halves them; short sequences take one smaller tile."""
  padded_dim = max(16, 1 << (head_dim - 1).bit_length())
  block = 128 if padded_dim <= 128 else 64
  return min(block, max(16, 1 << (max(q_len, kv_len) - 1).bit_length())), padded_dim


def _kv_range(q_start, *, band: Band, block: int, nk: int):
  """Key blocks [lo, hi) that queries q_start .. q_start + block - 1 may see."""
  if band.left is None:
    lo = 0
  else:
    lo = jnp.maximum(q_start + band.offset - band.left, 0) // block
  if band.right is None:
    hi = nk
  else:
    hi = jnp.minimum(nk, (q_start + block - 1 + band.offset + band.right) // block + 1)
  return lo, hi


def _q_range(k_start, *, band: Band, block: int, nq: int):
  """Query blocks [lo, hi) whose _kv_range holds the key block at k_start (the
  exact transpose, so the backward visits what the forward visited)."""
  if band.right is None:
    lo = 0
  else:
    lo = jnp.maximum(k_start - band.offset - band.right, 0) // block
  if band.left is None:
    hi = nq
  else:
    last = k_start + block - 1 - band.offset + band.left
    hi = jnp.where(last < 0, 0, jnp.minimum(nq, last // block + 1))
  return lo, hi


def _visible(qpos, kpos, qseg, kseg, kglobal, band: Band):
  rel = (qpos[:, None] + band.offset) - kpos[None, :]
  near = None
  if band.left is not None:
    near = rel <= band.left
  if band.right is not None:
    far_right = -rel <= band.right
    near = far_right if near is None else near & far_right
  if kglobal is not None:
    glob = kglobal[None, :] != 0
    near = glob if near is None else near | glob
  vis = (rel == rel) if near is None else near
  if band.causal:
    vis = vis & (rel >= 0)
  if qseg is not None:
    vis = vis & (qseg[:, None] == kseg[None, :])
  return vis


def _load_keys(k_ref, v_ref, kseg_ref, kglob_ref, k_start, block):
  rows = pl.ds(k_start, block)
  return (k_ref[rows, :], v_ref[rows, :],
          None if kseg_ref is None else kseg_ref[rows],
          None if kglob_ref is None else kglob_ref[rows])


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, kglob_ref, o_ref, lse_ref, *,
                    band: Band, block: int):
  nk = k_ref.shape[0] // block
  q_start = pl.program_id(0) * block
  q = q_ref[...]
  qpos = q_start + jnp.arange(block)
  qseg = None if qseg_ref is None else qseg_ref[pl.ds(q_start, block)]
  lo, hi = _kv_range(q_start, band=band, block=block, nk=nk)

  def body(kb, carry):
    o, m, l = carry
    k_start = kb * block
    k, v, kseg, kglob = _load_keys(k_ref, v_ref, kseg_ref, kglob_ref, k_start, block)
    vis = _visible(qpos, k_start + jnp.arange(block), qseg, kseg, kglob, band)
    s = jnp.where(vis, pl.dot(q, k, trans_b=True).astype(jnp.float32), MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1)
    o = o * correction[:, None] + pl.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return o, m_new, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), MASK_VALUE, jnp.float32),
           jnp.zeros((block,), jnp.float32))
  o, m, l = lax.fori_loop(lo, hi, body, carry)
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (o / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe), MASK_VALUE)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, kglob_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, band: Band, block: int):
  nk = k_ref.shape[0] // block
  q_start = pl.program_id(0) * block
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  qpos = q_start + jnp.arange(block)
  qseg = None if qseg_ref is None else qseg_ref[pl.ds(q_start, block)]
  lo, hi = _kv_range(q_start, band=band, block=block, nk=nk)

  def body(kb, dq):
    k_start = kb * block
    k, v, kseg, kglob = _load_keys(k_ref, v_ref, kseg_ref, kglob_ref, k_start, block)
    vis = _visible(qpos, k_start + jnp.arange(block), qseg, kseg, kglob, band)
    s = pl.dot(q, k, trans_b=True).astype(jnp.float32)
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    dp = pl.dot(do, v, trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + pl.dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, kglob_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, band: Band, block: int, q_len: int):
  # q_ref, do_ref: [group * q_len, d], the query heads of this key/value head
  # one after another; lse_ref, delta_ref likewise [group * q_len].
  nq = q_len // block
  group = q_ref.shape[0] // q_len
  k_start = pl.program_id(0) * block
  k, v = k_ref[...], v_ref[...]
  kpos = k_start + jnp.arange(block)
  kseg = None if kseg_ref is None else kseg_ref[pl.ds(k_start, block)]
  kglob = None if kglob_ref is None else kglob_ref[pl.ds(k_start, block)]
  lo, hi = _q_range(k_start, band=band, block=block, nq=nq)
  count = jnp.maximum(hi - lo, 0)

  def body(step, carry):
    dk, dv = carry
    head, qb = step // jnp.maximum(count, 1), lo + step % jnp.maximum(count, 1)
    q_start = qb * block
    rows = pl.ds(head * q_len + q_start, block)
    q, do, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows]
    qseg = None if qseg_ref is None else qseg_ref[pl.ds(q_start, block)]
    vis = _visible(q_start + jnp.arange(block), kpos, qseg, kseg, kglob, band)
    s = pl.dot(q, k, trans_b=True).astype(jnp.float32)
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
    dp = pl.dot(do, v, trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + pl.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group * count, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(head_dim: int):
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _vector_spec(length):
  return None if length is None else pl.BlockSpec((None, length), lambda i, b, h: (b, 0))


def _forward(q, k, v, qseg, kseg, kglob, band, block, out_dtype, interpret):
  batch, heads, q_len, dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  rows = pl.BlockSpec((None, None, block, dim), lambda i, b, h: (b, h, i, 0))
  keys = pl.BlockSpec((None, None, kv_len, dim), lambda i, b, h: (b, h // group, 0, 0))
  seg = lambda x, n: None if x is None else _vector_spec(n)
  return pl.pallas_call(
      functools.partial(_forward_kernel, band=band, block=block),
      grid=(q_len // block, batch, heads),
      in_specs=[rows, keys, keys, seg(qseg, q_len), seg(kseg, kv_len), seg(kglob, kv_len)],
      out_specs=[rows, pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(dim),
      interpret=interpret, name='longjax_blocksparse_fwd')(q, k, v, qseg, kseg, kglob)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, qseg, kseg, kglob, band, block, out_dtype, interpret):
  return _forward(q, k, v, qseg, kseg, kglob, band, block, out_dtype, interpret)


def _attention_fwd(q, k, v, qseg, kseg, kglob, band, block, out_dtype, interpret):
  o, lse = _forward(q, k, v, qseg, kseg, kglob, band, block, out_dtype, interpret)
  return (o, lse), (q, k, v, qseg, kseg, kglob, o, lse)


def _attention_bwd(band, block, out_dtype, interpret, residuals, cotangents):
  del out_dtype
  q, k, v, qseg, kseg, kglob, o, lse = residuals
  do, dlse = cotangents
  batch, heads, q_len, dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  do = do.astype(q.dtype)
  # d lse_i / d s_ij = p_ij, so the lse's cotangent enters as a shift of delta
  # (FlashAttention-2's D_i = rowsum(dO * O)).
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse
  params = None if interpret else _compiler_params(dim)
  seg = lambda x, n: None if x is None else _vector_spec(n)
  rows = pl.BlockSpec((None, None, block, dim), lambda i, b, h: (b, h, i, 0))
  row_vector = pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
  keys = pl.BlockSpec((None, None, kv_len, dim), lambda i, b, h: (b, h // group, 0, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, band=band, block=block),
      grid=(q_len // block, batch, heads),
      in_specs=[rows, keys, keys, seg(qseg, q_len), seg(kseg, kv_len), seg(kglob, kv_len),
                rows, row_vector, row_vector],
      out_specs=rows, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret,
      name='longjax_blocksparse_dq')(q, k, v, qseg, kseg, kglob, do, lse, delta)

  # dK/dV per key/value head: its query heads are contiguous in heads-major
  # order, so [b, kv_heads, group * q_len, d] views them as one long row.
  grouped = lambda x: x.reshape((batch, kv_heads, group * q_len) + x.shape[3:])
  all_queries = pl.BlockSpec((None, None, group * q_len, dim), lambda j, b, h: (b, h, 0, 0))
  all_vectors = pl.BlockSpec((None, None, group * q_len), lambda j, b, h: (b, h, 0))
  key_rows = pl.BlockSpec((None, None, block, dim), lambda j, b, h: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, band=band, block=block, q_len=q_len),
      grid=(kv_len // block, batch, kv_heads),
      in_specs=[all_queries, key_rows, key_rows, seg(qseg, q_len), seg(kseg, kv_len),
                seg(kglob, kv_len), all_queries, all_vectors, all_vectors],
      out_specs=[key_rows, key_rows],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret,
      name='longjax_blocksparse_dkv')(grouped(q), k, v, qseg, kseg, kglob, grouped(do),
                                      grouped(lse), grouped(delta))
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attend(q, k, v, *, band: Band, segment_ids=None, kv_segment_ids=None, key_global=None,
           out_dtype=None, interpret: bool = False):
  """Block-sparse attention, heads-major, queries already scaled.

  Args:
    q: [b, heads, q_len, d]; k, v: [b, kv_heads, kv_len, d] (heads % kv_heads == 0).
    band: the static mask (module doc).
    segment_ids [b, q_len], kv_segment_ids [b, kv_len]: ints, or both None.
    key_global: [b, kv_len] bool, keys visible across the band (or None).
    out_dtype: of the output; default q's.
  Returns:
    (out [b, heads, q_len, d], lse [b, heads, q_len] float32), both
    differentiable; rows that see no key get out 0 and lse MASK_VALUE.

  Any length and head_dim: the wrapper pads lengths to the block and head_dim
  to a power of two (a Triton requirement) with keys no query sees.
  """
  batch, heads, q_len, dim = q.shape
  kv_len = k.shape[2]
  out_dtype = q.dtype if out_dtype is None else out_dtype
  block, padded_dim = _tiling(q_len, kv_len, dim)
  q_pad, kv_pad = -(-q_len // block) * block, -(-kv_len // block) * block
  if (q_pad, kv_pad) != (q_len, kv_len) and segment_ids is None:
    segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  if segment_ids is not None:  # padded queries and keys: segments no real token has
    segment_ids = pad_axis(segment_ids.astype(jnp.int32), 1, q_pad, jnp.iinfo(jnp.int32).min)
    kv_segment_ids = pad_axis(kv_segment_ids.astype(jnp.int32), 1, kv_pad,
                          jnp.iinfo(jnp.int32).min + 1)
  if key_global is not None:
    key_global = pad_axis(key_global.astype(jnp.int32), 1, kv_pad)
  q = pad_axis(pad_axis(q, 3, padded_dim), 2, q_pad)
  k = pad_axis(pad_axis(k, 3, padded_dim), 2, kv_pad)
  v = pad_axis(pad_axis(v, 3, padded_dim), 2, kv_pad)
  out, lse = _attention(q, k, v, segment_ids, kv_segment_ids, key_global, band, block,
                        jnp.dtype(out_dtype), bool(interpret))
  return out[:, :, :q_len, :dim], lse[:, :, :q_len]


def visited_key_blocks(q_len: int, kv_len: int, head_dim: int, band: Band):
  """(block, lo [nq], hi [nq]): the key blocks each query block visits, as the
  kernel computes them (for callers that add the keys outside, and for tests)."""
  block, _ = _tiling(q_len, kv_len, head_dim)
  nq, nk = -(-q_len // block), -(-kv_len // block)
  starts = jnp.arange(nq) * block
  lo, hi = _kv_range(starts, band=band, block=block, nk=nk)
  return block, jnp.broadcast_to(lo, (nq,)), jnp.broadcast_to(hi, (nq,))
