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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

# Splash needs kv blocks that are multiples of 128 with segment ids.
GRANULE = 128


class BandMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
  """Query i sees key j iff -right <= i - j <= left, or j < global_columns (and j <= i
  when causal). Hashable; classified block by block without materialising."""

  def __init__(self, shape, *, left: Optional[int], right: Optional[int], causal: bool,
               global_columns: int = 0):
    self.left, self.right, self.causal, self.global_columns = left, right, causal, global_columns

    def visible(q_ids, kv_ids):  # numpy while classifying, jax in the kernel
      rel = q_ids - kv_ids
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
    lowest, highest = q0 - (k1 - 1), (q1 - 1) - k0
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
    return (self.shape, self.left, self.right, self.causal, self.global_columns)


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
           segment_ids=None, global_columns: int = 0, interpret: bool = False):
  """Splash attention, heads-major, queries already scaled (self-attention).

  q: [b, heads, l, d]; k, v: [b, kv_heads, l, d]; segment_ids [b, l] or None.
  Returns [b, heads, l, d] in q's dtype.
  """
  batch, heads, length, _ = q.shape
  padded = -(-length // GRANULE) * GRANULE
  if padded != length:
    real = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
    # Padding is a segment of its own (it sees itself; no real token sees it).
    segment_ids = jnp.pad(real.astype(jnp.int32), ((0, 0), (0, padded - length)),
                          constant_values=jnp.iinfo(jnp.int32).min)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
  mask = BandMask((padded, padded), left=left, right=right, causal=causal,
                  global_columns=global_columns)
  kernel = _kernel(mask, heads, block_size(padded), bool(interpret))
  if segment_ids is None:
    # (A lambda, not vmap(kernel): vmapping the kernel pytree itself makes its
    # mask tables arguments, which jax.export then miscounts.)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
  else:
    ids = segment_ids.astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash_lib.SegmentIds(q=s, kv=s)))(
        q, k, v, ids)
  return out[:, :, :length]
