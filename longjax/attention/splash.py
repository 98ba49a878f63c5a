"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for the band masks.

Splash is the TPU's block-sparse flash attention (MaxText's, with its
`LocalMask`): a static [q_len, kv_len] mask classifies every block pair as
empty, partial or full, the grid skips the empty ones, and segment ids are
ANDed in the kernel. longjax gives it one mask class, `BandMask`: the window
-right <= (i - j) <= left (None: no limit), causal, plus optionally the first
`global_columns` keys for every query (global_local's prefix globals),
evaluated in the kernel from iotas and never materialised.

What differs from longjax's kernels, and how this module bridges it:
  * no batch axis: the kernel is vmapped over the batch;
  * no softmax scale: queries come pre-scaled (as every longjax kernel scales them);
  * no additive bias: layers with a position bias (t5_bias) stay on XLA;
  * a query that sees no key returns the mean of the values, where longjax
    returns 0: every mask built here lets each query see itself, and padded
    positions get a segment of their own, so no row is ever empty;
  * segments need blocks that are multiples of 128: lengths are padded to
    the block;
  * building a mask's block table is a Python loop over all block pairs in
    splash (128 s for a local mask at 64k): `BandMask` answers the loop's
    question for a block from the band's geometry in O(1), and evaluates only
    the partial blocks (those the band's edges cross, O(n) of them), and the
    kernel is cached per (mask, heads, block).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

# Splash needs kv blocks that are multiples of 128 with segment ids.
GRANULE = 128


class BandMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
  """Query i sees key j iff -right <= rel <= left with rel = i + offset - j, or j <
  global_columns (and rel >= 0 when causal). Hashable; classified block by block
  without materialising. offset: query i sits at key position i + offset (a
  sequence shard's queries against [left halo | own keys | right halo])."""

  def __init__(self, shape, *, left: Optional[int], right: Optional[int], causal: bool,
               global_columns: int = 0, offset: int = 0):
    self.left, self.right, self.causal, self.global_columns = left, right, causal, global_columns
    self.offset = offset

    def visible(q_ids, kv_ids):  # numpy while classifying, jax in the kernel
      rel = q_ids + offset - kv_ids
      near = (rel >= 0) | (rel < 0)
      if left is not None:
        near = near & (rel <= left)
      if right is not None:
        near = near & (rel >= -right)
      if global_columns:
        near = near | (kv_ids < global_columns)
      if causal:
        near = near & (rel >= 0)
      return near

    super().__init__(shape=shape, mask_function=visible)

  def _window_holds(self, rel):
    return ((self.left is None or rel <= self.left) and (self.right is None or rel >= -self.right)
            and (not self.causal or rel >= 0))

  def __getitem__(self, idx):
    q_slice, kv_slice = idx
    q0, q1 = q_slice.start or 0, q_slice.stop or self.shape[0]
    k0, k1 = kv_slice.start or 0, kv_slice.stop or self.shape[1]
    lowest, highest = q0 + self.offset - (k1 - 1), (q1 - 1) + self.offset - k0
    if self._window_holds(lowest) and self._window_holds(highest):
      return np.ones((1, 1), bool)  # the window is convex in rel: the whole block
    outside = ((self.left is not None and lowest > self.left) or
             (self.right is not None and highest < -self.right) or
             (self.causal and highest < 0))
    if outside and k0 >= self.global_columns:
      return np.zeros((1, 1), bool)
    return super().__getitem__(idx)

  def __eq__(self, other):
    return isinstance(other, BandMask) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def _key(self):
    return (self.shape, self.left, self.right, self.causal, self.global_columns, self.offset)


def block_size(length: int) -> int:
  """Largest of 512, 256, 128 dividing the padded length (MaxText's default is 512)."""
  for block in (512, 256):
    if length % block == 0:
      return block
  return GRANULE


@functools.lru_cache(maxsize=64)
def _kernel(mask: BandMask, heads: int, block: int, interpret: bool):
  sizes = splash_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Built eagerly even when first asked for while tracing: the cached kernel's
  # mask tables must be concrete arrays, not the tracers of one trace.
  with jax.ensure_compile_time_eval():
    return splash_lib.make_splash_mha(splash_lib.MultiHeadMask([mask] * heads),
                                      block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def attend(q, k, v, *, left: Optional[int], right: Optional[int], causal: bool,
           segment_ids=None, kv_segment_ids=None, global_columns: int = 0, offset: int = 0,
           interpret: bool = False):
  """Splash attention, heads-major, queries already scaled.

  q: [b, heads, q_len, d]; k, v: [b, kv_heads, kv_len, d]; segment_ids [b, q_len]
  (and kv_segment_ids [b, kv_len], default segment_ids) or None. Self-attention
  (offset 0, equal lengths), or a sequence shard's queries at key positions
  i + offset. Every query must see at least one key (module doc).
  Returns [b, heads, q_len, d] in q's dtype.
  """
  batch, heads, q_len, _ = q.shape
  kv_len = k.shape[2]
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  q_pad, kv_pad = (-(-n // GRANULE) * GRANULE for n in (q_len, kv_len))
  if (q_pad, kv_pad) != (q_len, kv_len):
    # Padding is a segment of its own (padded queries see padded keys; no real
    # token sees them).
    pad_ids = lambda ids, n, padded: jnp.pad(
        (jnp.zeros((batch, n), jnp.int32) if ids is None else ids.astype(jnp.int32)),
        ((0, 0), (0, padded - n)), constant_values=jnp.iinfo(jnp.int32).min)
    segment_ids = pad_ids(segment_ids, q_len, q_pad)
    kv_segment_ids = pad_ids(kv_segment_ids, kv_len, kv_pad)
    pad = lambda x, padded: jnp.pad(x, ((0, 0), (0, 0), (0, padded - x.shape[2]), (0, 0)))
    q, k, v = pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad)
  mask = BandMask((q_pad, kv_pad), left=left, right=right, causal=causal,
                  global_columns=global_columns, offset=offset)
  kernel = _kernel(mask, heads, math.gcd(block_size(q_pad), block_size(kv_pad)), bool(interpret))
  if segment_ids is None:
    # (A lambda, not vmap(kernel): vmapping the kernel pytree itself makes its
    # mask tables arguments, which jax.export then miscounts.)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
  else:
    out = jax.vmap(lambda q, k, v, s, t: kernel(q, k, v, splash_lib.SegmentIds(q=s, kv=t)))(
        q, k, v, segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
  return out[:, :, :q_len]
