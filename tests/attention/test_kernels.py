"""Every attention kind against an independent dense reference: outputs and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import attention
from tests.attention import cases
from tests.attention import reference as ref
from tests.attention.cases import (CASES, HEADS, adaptive_reference, make_inputs,
                                   make_segments, summaries)


def _loss(fn, cotangent):
  return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize('segments', [False, True], ids=['noseg', 'seg'])
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('length', [37, 67])
@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_dense_reference_fp32(case, length, causal, segments):
  kernel, reference = CASES[case].kernel, CASES[case].reference
  q, k, v = make_inputs(length, length)
  seg = make_segments(length, length) if segments else None
  got = jax.jit(lambda q, k, v: kernel(q, k, v, causal, seg))(q, k, v)
  want = jax.jit(lambda q, k, v: reference(q, k, v, causal, seg))(q, k, v)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)

  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  got_grads = jax.jit(jax.grad(_loss(lambda q, k, v: kernel(q, k, v, causal, seg), cotangent),
                               argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.jit(jax.grad(
      _loss(lambda q, k, v: reference(q, k, v, causal, seg), cotangent),
      argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f'd/d{name}')


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_multi_query_matches_dense_reference(case, causal):
  """One key/value head shared by every query head (MQA), with segments."""
  kernel, reference = CASES[case].kernel, CASES[case].reference
  q, k, v = make_inputs(31, 37, kv_heads=1)
  seg = make_segments(31, 37)
  fn = lambda q, k, v: kernel(q, k, v, causal, seg)
  ref_fn = lambda q, k, v: reference(q, k, v, causal, seg)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), ref_fn(q, k, v), atol=2e-5, rtol=2e-5)
  cotangent = jax.random.normal(jax.random.key(5), q.shape)
  got = jax.jit(jax.grad(_loss(fn, cotangent), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(_loss(ref_fn, cotangent), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip('qkv', got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f'd/d{name}')


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_very_negative_scores_stay_exact_and_finite(case, causal):
  """Every visible score around -100: a softmax is shift-invariant, so the output
  and gradients must still match the reference, even where a query's parts
  (window, global keys, summaries) are partly empty. Trained passkey models
  reached such scores; a merge that let an empty part's placeholder max (0)
  outrank them gave zero outputs and NaN gradients."""
  kernel, reference = CASES[case].kernel, CASES[case].reference
  length = 67
  q, k, v = make_inputs(11, length)
  q = 0.1 * q + 6.0
  k = 0.1 * k - 6.0  # q . k / sqrt(8) ~ -100 for every pair.
  seg = make_segments(11, length)
  fn = lambda q, k, v: kernel(q, k, v, causal, seg)
  ref_fn = lambda q, k, v: reference(q, k, v, causal, seg)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), jax.jit(ref_fn)(q, k, v),
                             atol=2e-5, rtol=2e-5)
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  got = jax.jit(jax.grad(_loss(fn, cotangent), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(_loss(ref_fn, cotangent), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip('qkv', got, want):
    assert np.all(np.isfinite(g)), f'd/d{name} is not finite'
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f'd/d{name}')


@pytest.mark.parametrize('case', sorted(CASES))
def test_bf16_close_to_fp32_reference(case):
  kernel, reference = CASES[case].kernel, CASES[case].reference
  length = 67
  q, k, v = make_inputs(7, length, dtype=jnp.bfloat16)
  seg = make_segments(7, length)
  got = jax.jit(lambda q, k, v: kernel(q, k, v, True, seg))(q, k, v)
  assert got.dtype == jnp.bfloat16
  want = jax.jit(lambda q, k, v: reference(q, k, v, True, seg))(q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=4e-2, rtol=4e-2)
  cotangent = jax.random.normal(jax.random.key(2), q.shape)
  got_grads = jax.jit(jax.grad(_loss(lambda q, k, v: kernel(q, k, v, True, seg), cotangent),
                               argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.jit(jax.grad(
      _loss(lambda q, k, v: reference(q, k, v, True, seg), cotangent),
      argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == jnp.bfloat16
    g = np.asarray(g, np.float32)
    assert np.all(np.isfinite(g))
    # bf16 rounding of inputs and products: compare relative to the gradient's scale.
    np.testing.assert_allclose(g, w, atol=0.05 * float(np.abs(w).max()), rtol=0)


def test_adaptive_span_gradient_reaches_spans():
  length = 37
  q, k, v = make_inputs(3, length)
  spans = jnp.array([1.0, 3.5, 9.0, 20.0])
  cotangent = jax.random.normal(jax.random.key(3), q.shape)

  def loss(fn):
    return lambda spans: jnp.sum(fn(spans) * cotangent)

  got = jax.grad(loss(lambda s: attention.adaptive_span(
      q, k, v, spans=s, max_span=24, span_ramp=4.0, causal=True)))(spans)
  want = jax.grad(loss(lambda s: adaptive_reference(q, k, v, True, None, 24, 4.0, spans=s)))(spans)
  assert np.all(np.abs(want) > 0)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_adaptive_span_needed_radius_gives_same_output():
  q, k, v = make_inputs(4, 67)
  spans = jnp.array([0.0, 2.0, 5.5, 7.0])
  radius = attention.needed_radius(spans, span_ramp=4.0, max_span=40)
  assert radius == 10  # m(x) > 0 iff x < 4 + 7
  full = attention.adaptive_span(q, k, v, spans=spans, max_span=40, span_ramp=4.0)
  trimmed = attention.adaptive_span(q, k, v, spans=spans, max_span=40, span_ramp=4.0, radius=radius)
  np.testing.assert_allclose(trimmed, full, atol=1e-6)
  shorter = attention.adaptive_span(q, k, v, spans=spans, max_span=40, span_ramp=4.0, radius=radius - 1)
  assert not np.allclose(shorter, full, atol=1e-6)
  np.testing.assert_allclose(attention.span_penalty(spans), np.mean(spans))


def test_position_bias_matches_reference():
  """bias_fn receives query_pos - key_pos and adds a per-head bias."""
  length = 67
  q, k, v = make_inputs(5, length)
  table = jax.random.normal(jax.random.key(0), (2 * length + 1, HEADS))
  bias_fn = lambda rel: table[rel + length]
  rel = np.arange(length)[:, None] - np.arange(length)[None, :]
  dense_bias = jnp.moveaxis(table[rel + length], -1, 0)[None]
  for causal in (False, True):
    want = ref.dense(q, k, v, ref.mask_local(2, length, radius=9, causal=causal), bias=dense_bias)
    got = attention.local(q, k, v, radius=9, causal=causal, bias_fn=bias_fn)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    want = ref.dense(q, k, v, ref.mask_full(2, length, length, causal=causal), bias=dense_bias)
    got = attention.dot_product(q, k, v, causal=causal, bias_fn=bias_fn)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    got = attention.global_local(q, k, v, radius=length, num_global=2, causal=causal,
                                 bias_fn=bias_fn)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_transient_global_biases_match_reference(causal):
  """The token bias on query_pos - key_pos, the summaries' own on block distance."""
  length, block = 67, 5
  q, k, v = make_inputs(5, length)
  seg = make_segments(5, length)
  table = jax.random.normal(jax.random.key(0), (2 * length + 1, HEADS))
  side = jax.random.normal(jax.random.key(1), (2 * length + 1, HEADS))
  rel = np.arange(length)[:, None] - np.arange(length)[None, :]
  dense_bias = jnp.moveaxis(table[rel + length], -1, 0)[None]
  extra = summaries(k, block)
  want = ref.transient_global(q, k, v, **extra, radius=4, block_size=block, causal=causal,
                              segment_ids=seg, bias=dense_bias,
                              summary_bias=lambda d: np.asarray(side[d + length]))
  got = attention.transient_global(q, k, v, **extra, radius=4, summary_block=block,
                                   causal=causal, segment_ids=seg,
                                   bias_fn=lambda r: table[r + length],
                                   summary_bias_fn=lambda d: side[d + length])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_cross_attention_and_fully_masked_rows():
  q, _, _ = make_inputs(6, 11)
  _, k, v = make_inputs(8, 29)
  q_seg = jnp.array([[1] * 6 + [0] * 5, [1] * 11])
  kv_seg = jnp.array([[1] * 20 + [0] * 9, [2] * 29])  # row 1: no key shares segment 1
  got = attention.dot_product(q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg)
  want = ref.dense(q, k, v, ref.mask_full(2, 11, 29, causal=False, segment_ids=q_seg,
                                           kv_segment_ids=kv_seg))
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_array_equal(got[1], 0.0)
  grads = jax.grad(lambda q, k, v: jnp.sum(attention.dot_product(
      q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg)), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  # Causal cross-attention: the queries are the last positions of the keys.
  got = attention.dot_product(q, k, v, causal=True)
  np.testing.assert_allclose(got, ref.dense(q, k, v, ref.mask_full(2, 11, 29, causal=True)),
                             atol=2e-5)


def test_local_window_matches_jax_dot_product_attention_window():
  """The cuDNN path passes local_window_size=(r, r) / (r, 0); check that jax
  means the same window, through its XLA implementation (runs on CPU)."""
  q, k, v = make_inputs(9, 67, kv_heads=HEADS)
  for causal in (False, True):
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='xla',
                                        local_window_size=(5, 0 if causal else 5))
    np.testing.assert_allclose(attention.local(q, k, v, radius=5, causal=causal), want,
                               atol=2e-5, rtol=2e-5)


def test_implementation_switch_on_cpu():
  q, k, v = make_inputs(10, 33)
  xla = attention.local(q, k, v, radius=4, implementation='xla')
  np.testing.assert_array_equal(attention.local(q, k, v, radius=4, implementation='auto'), xla)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="'cudnn' runs on GPUs"):
      attention.local(q, k, v, radius=4, implementation='cudnn', causal=True)
  with pytest.raises(ValueError, match="one of 'auto', 'xla', 'cudnn', 'splash', 'pallas_gpu'"):
    attention.dot_product(q, k, v, implementation='flash')
  # Kinds whose registry entry lists only 'xla' refuse 'cudnn' on any backend.
  with pytest.raises(ValueError, match="does not compute this kind"):
    attention.transient_global(q, k, v, **summaries(k, 4), radius=4, summary_block=4,
                               implementation='cudnn')
  assert attention.spec('transient_global').implementations == ('xla',)
  assert 'cudnn' in attention.spec('local').implementations


@pytest.mark.parametrize('marked', [False, True], ids=['prefix', 'marked'])
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_global_local_separate_projections_match_reference(causal, marked):
  """Longformer's Q_g, K_g, V_g: global rows from their own projections, outputs
  and gradients of all six inputs."""
  length = 67
  q, k, v = make_inputs(21, length)
  global_qkv = make_inputs(22, length)
  seg = make_segments(21, length)
  mask = jnp.asarray(cases.marked_globals(length)) if marked else None
  reference = cases.CASES['global_local_mask' if marked else 'global_local'].reference
  fn = lambda q, k, v, qg, kg, vg: attention.global_local(
      q, k, v, radius=4, num_global=3, causal=causal, segment_ids=seg, global_mask=mask,
      global_qkv=(qg, kg, vg))
  ref_fn = lambda q, k, v, qg, kg, vg: reference(q, k, v, causal, seg, (qg, kg, vg))
  args = (q, k, v) + tuple(global_qkv)
  np.testing.assert_allclose(jax.jit(fn)(*args), ref_fn(*args), atol=2e-5, rtol=2e-5)
  cotangent = jax.random.normal(jax.random.key(4), q.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cotangent)
  got = jax.jit(jax.grad(loss(fn), argnums=range(6)))(*args)
  want = jax.grad(loss(ref_fn), argnums=range(6))(*args)
  for name, g, w in zip(['q', 'k', 'v', 'q_g', 'k_g', 'v_g'], got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f'd/d{name}')
