"""The accelerator kernels (splash for TPU, longjax's Pallas kernel for GPU) on CPU.

Three kinds of check, none needing an accelerator:
  * numerics: every (kind, implementation) pair, run by the Pallas interpreter
    through the public API, against the dense references of
    tests/attention/reference.py (outputs and gradients);
  * sparsity: the key blocks each kernel visits are exactly those the mask
    reaches (so no empty block is ever loaded);
  * lowering: lowering for 'tpu' and 'cuda' (what jax.export runs) at L = 32k,
    head_dim 128, bf16: the Pallas-to-Mosaic / Pallas-to-Triton lowering of
    every pair, forward and gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import attention
from longjax.attention import implementations, pallas_gpu, splash
from tests.attention import reference as ref
from tests.attention.cases import Case, _global_local, _local, make_inputs, make_segments

ACCELERATED = ('splash', 'pallas_gpu')


def _marked(length):
  mask = np.zeros((2, length), bool)
  mask[0, [3, 130, 131, length - 2]] = True
  mask[1, [0, length // 2, length - 1]] = True
  return mask


KERNEL_CASES = {
    'full': Case('full', {}, lambda q, k, v, causal, seg: ref.dense(q, k, v, ref.mask_full(
        q.shape[0], q.shape[1], q.shape[1], causal=causal, segment_ids=seg))),
    'local': Case('local', dict(radius=40), _local(40)),
    'chunked': Case('chunked', dict(chunk_size=50),
                    lambda q, k, v, causal, seg: ref.dense(q, k, v, ref.mask_chunked(
                        q.shape[0], q.shape[1], block_size=50, causal=causal,
                        segment_ids=seg))),
    'global_local': Case('global_local', dict(radius=30, num_global=5), _global_local(30, 5)),
    'global_local_marked': Case(
        'global_local', dict(radius=30, num_global=2), _global_local(30, 2, _marked),
        inputs=lambda k: dict(global_mask=jnp.asarray(_marked(k.shape[1])))),
}
# Splash masks are static: global_local's globals must be the row's prefix (no
# segments, no marks); `test_splash_refuses_packed_global_tokens` checks the refusal.
SPLASH_NEEDS_ONE_ROW = ('global_local', 'global_local_marked')


def _pairs():
  for case, kernel_case in KERNEL_CASES.items():
    for implementation in attention.spec(kernel_case.kind).implementations:
      if implementation in ACCELERATED and (case, implementation) != (
          'global_local_marked', 'splash'):  # marks are refused (test below)
        yield case, implementation


# (length, causal, segments): an odd length that is padded, packed segments.
VARIANTS = [(300, False, True), (512, True, True), (384, False, False)]
FAST = {('local', 'pallas_gpu', VARIANTS[0]), ('local', 'splash', VARIANTS[0])}


def _params():
  for case, implementation in _pairs():
    for variant in VARIANTS:
      segments = variant[2]
      if implementation == 'splash' and case in SPLASH_NEEDS_ONE_ROW and segments:
        continue
      marks = () if (case, implementation, variant) in FAST else (pytest.mark.slow,)
      yield pytest.param(case, implementation, variant, marks=marks,
                         id=f'{case}-{implementation}-L{variant[0]}-'
                            f'{"causal" if variant[1] else "bidir"}-{"seg" if segments else "row"}')


def _loss(fn, cotangent):
  return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize('case,implementation,variant', list(_params()))
def test_kernel_matches_dense_reference(case, implementation, variant):
  length, causal, segments = variant
  q, k, v = make_inputs(length, length)
  seg = make_segments(length, length) if segments else None
  kernel_case = KERNEL_CASES[case]
  extra = kernel_case.inputs(k)
  run = lambda q, k, v: attention.get(kernel_case.kind)(
      q, k, v, causal=causal, segment_ids=seg, implementation=implementation,
      **kernel_case.settings, **extra)
  want = lambda q, k, v: kernel_case.reference(q, k, v, causal, seg)
  np.testing.assert_allclose(run(q, k, v), want(q, k, v), atol=2e-5, rtol=2e-5)
  cotangent = jnp.asarray(np.random.default_rng(length).normal(size=q.shape), jnp.float32)
  got = jax.grad(_loss(run, cotangent), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(_loss(want, cotangent), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', got, expected):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=f'd{name}')


@pytest.mark.slow
@pytest.mark.parametrize('case', ['full', 'global_local'])
@pytest.mark.parametrize('implementation', ACCELERATED)
def test_multi_query_matches_dense_reference(case, implementation):
  """One key/value head for every query head (MQA)."""
  q, k, v = make_inputs(5, 256, kv_heads=1)
  kernel_case = KERNEL_CASES[case]
  got = attention.get(kernel_case.kind)(q, k, v, causal=True, implementation=implementation,
                                        **kernel_case.settings)
  np.testing.assert_allclose(got, kernel_case.reference(q, k, v, True, None), atol=2e-5,
                             rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('implementation', ACCELERATED)
def test_bf16_close_to_fp32_reference(implementation):
  q, k, v = make_inputs(7, 256, dtype=jnp.bfloat16)
  seg = make_segments(7, 256)
  out = attention.local(q, k, v, radius=40, causal=True, segment_ids=seg,
                        implementation=implementation)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = KERNEL_CASES['local'].reference(*f32, True, seg)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)


def test_rows_that_see_no_key_are_zero():
  """Cross-attention where a query's segment has no key (longjax's contract: 0)."""
  q, _, _ = make_inputs(3, 40)
  _, k, v = make_inputs(4, 70)
  q_seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], 10, axis=1).repeat(2, 0))
  kv_seg = jnp.asarray(np.repeat([[1, 2, 5, 1, 2, 5, 7]], 10, axis=1).repeat(2, 0))
  out = attention.dot_product(q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg,
                              implementation='pallas_gpu')
  want = attention.dot_product(q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg,
                               implementation='xla')
  np.testing.assert_allclose(out, want, atol=2e-5)
  assert not np.any(np.asarray(out)[:, 20:])  # segments 3 and 4 have no key


def test_splash_refuses_packed_global_tokens():
  q, k, v = make_inputs(1, 256)
  with pytest.raises(ValueError, match="splash's masks are static"):
    attention.global_local(q, k, v, radius=8, num_global=4, segment_ids=make_segments(1, 256),
                           implementation='splash')


@pytest.mark.parametrize('band', [
    pallas_gpu.Band(200, 200, False), pallas_gpu.Band(200, 0, True), pallas_gpu.Band(None, 0, True),
    pallas_gpu.Band(None, None, False), pallas_gpu.Band(None, 0, True, offset=384)])
def test_pallas_kernel_visits_exactly_the_blocks_the_band_reaches(band):
  """Forward: [lo, hi) per query block; dK/dV: the transposed set. Both equal the
  block pairs holding at least one visible (query, key) pair."""
  q_len, kv_len = 2048 - (band.offset or 0), 2048
  block, lo, hi = pallas_gpu.visited_key_blocks(q_len, kv_len, 128, band)
  i = np.arange(q_len)[:, None] + band.offset
  j = np.arange(kv_len)[None, :]
  visible = np.ones((q_len, kv_len), bool)
  if band.left is not None:
    visible &= i - j <= band.left
  if band.right is not None:
    visible &= j - i <= band.right
  if band.causal:
    visible &= j <= i
  nq, nk = -(-q_len // block), -(-kv_len // block)
  reached = visible.reshape(nq, block, nk, block).any(axis=(1, 3))
  forward = np.zeros_like(reached)
  for qb in range(nq):
    forward[qb, int(lo[qb]):int(hi[qb])] = True
  np.testing.assert_array_equal(forward, reached)
  backward = np.zeros_like(reached)
  for kb in range(nk):
    first, end = pallas_gpu._q_range(kb * block, band=band, block=block, nq=nq)
    backward[int(first):int(end), kb] = True
  np.testing.assert_array_equal(backward, reached)


@pytest.mark.parametrize('left,right,causal,columns', [
    (40, 40, False, 0), (40, 0, True, 0), (None, 0, True, 0), (100, 100, False, 24),
    (100, 0, True, 24)])
def test_splash_band_mask_classifies_blocks_like_the_dense_mask(left, right, causal, columns):
  """BandMask answers splash's block loop from geometry; the block table it gives
  must be the one the materialised mask gives."""
  length, block = 1024, 128
  mask = splash.BandMask((length, length), left=left, right=right, causal=causal,
                         global_columns=columns)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  dense = np.ones((length, length), bool)
  if left is not None:
    dense &= i - j <= left
  if right is not None:
    dense &= j - i <= right
  dense |= j < columns
  if causal:
    dense &= j <= i
  np.testing.assert_array_equal(mask[0:length, 0:length], dense)
  n = length // block
  for qb in range(n):
    for kb in range(n):
      chunk = mask[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
      want = dense[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
      assert bool(chunk.any()) == bool(want.any()), (qb, kb)
      assert bool(chunk.all()) == bool(want.all()), (qb, kb)


@pytest.mark.parametrize('case,implementation', list(_pairs()))
def test_lowers_for_the_accelerator_at_32k(case, implementation):
  """jax.export for the kernel's platform, forward and gradient, at a real shape."""
  platform = {'splash': 'tpu', 'pallas_gpu': 'cuda'}[implementation]
  length, heads, kv_heads, dim = 32768, 8, 2, 128
  kernel_case = KERNEL_CASES[case]
  segmented = not (implementation == 'splash' and case in SPLASH_NEEDS_ONE_ROW)
  extra = {}
  if case == 'global_local_marked':
    extra['global_mask'] = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  shape = lambda h: jax.ShapeDtypeStruct((1, length, h, dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, length), jnp.int32) if segmented else None
  settings = dict(kernel_case.settings, radius=128) if 'radius' in kernel_case.settings else \
      dict(kernel_case.settings)

  def forward(q, k, v, *rest):
    segment_ids, marks = (rest + (None, None))[:2] if segmented else (None, None)
    more = {} if marks is None else dict(global_mask=marks)
    return attention.get(kernel_case.kind)(q, k, v, causal=True, segment_ids=segment_ids,
                                           implementation=implementation, **settings, **more)

  def gradient(q, k, v, *rest):
    loss = lambda q, k, v: forward(q, k, v, *rest).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  args = [shape(heads), shape(kv_heads), shape(kv_heads)] + ([seg] if segmented else [])
  args += [extra['global_mask']] if extra else []
  tag = {'tpu': 'tpu_custom_call', 'cuda': '__gpu$xla.gpu.triton'}[platform]
  with implementations.for_backend('tpu' if platform == 'tpu' else 'gpu'):
    for fn, calls in ((forward, 1), (gradient, 3)):
      # What jax.export(..., platforms=[platform]) runs, without its pytree
      # bookkeeping (which miscounts the constants splash's gradient closes over).
      lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
      assert lowered.as_text().count(tag) >= calls, (fn.__name__, tag)
