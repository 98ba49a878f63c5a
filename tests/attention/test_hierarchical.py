"""`hierarchical` is H-Transformer-1D (Zhu & Soricut 2021): the kernel against
an independent dense reference written from the paper and flaxformer
(tests/attention/reference.py: h_transformer_1d), on outputs and gradients,
with grouped- and multi-query heads, lengths off the block grid, packing and
a position bias; and its cost is linear."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import attention
from tests.attention import reference as ref
from tests.attention.cases import HEADS, intermediate_sizes, make_inputs, make_segments


def _loss(fn, cotangent):
  return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)


def _bias_fn(length):
  table = jax.random.normal(jax.random.key(4), (8 * length + 1, HEADS))
  return lambda rel: table[jnp.clip(rel, -4 * length, 4 * length) + 4 * length]


def _check(kernel, reference, q, k, v, atol=1e-5):
  got = jax.jit(kernel)(q, k, v)
  want = jax.jit(reference)(q, k, v)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  got_grads = jax.jit(jax.grad(_loss(kernel, cotangent), argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.jit(jax.grad(_loss(reference, cotangent), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2 * atol, rtol=2 * atol, err_msg=f'd/d{name}')


@pytest.mark.parametrize('segments', [False, True], ids=['noseg', 'seg'])
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('kv_heads', [2, 1], ids=['gqa', 'mqa'])
@pytest.mark.parametrize('length,block', [(37, 4), (67, 4), (200, 4), (67, 6)])
def test_matches_h_transformer_1d_reference(length, block, kv_heads, causal, segments):
  q, k, v = make_inputs(length + kv_heads, length, kv_heads=kv_heads)
  seg = make_segments(length, length) if segments else None
  _check(lambda q, k, v: attention.hierarchical(q, k, v, level0_block=block, causal=causal,
                                                segment_ids=seg),
         lambda q, k, v: ref.h_transformer_1d(q, k, v, block_size=block, causal=causal,
                                              segment_ids=seg), q, k, v)


@pytest.mark.parametrize('segments', [False, True], ids=['noseg', 'seg'])
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_position_bias_matches_reference(causal, segments):
  """Level 0 gets bias_fn(i - j); a coarse pair (p, c) at level l bias_fn((p - c) 2^l)."""
  length = 67
  q, k, v = make_inputs(21, length)
  seg = make_segments(21, length) if segments else None
  bias_fn = _bias_fn(length)
  _check(lambda q, k, v: attention.hierarchical(q, k, v, level0_block=4, causal=causal,
                                                segment_ids=seg, bias_fn=bias_fn),
         lambda q, k, v: ref.h_transformer_1d(q, k, v, block_size=4, causal=causal,
                                              segment_ids=seg, bias_fn=bias_fn), q, k, v)


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_packed_segment_equals_the_segment_alone(causal):
  """Every segment gets its own hierarchy: packed at any offset, among other
  segments and padding, it gives what it gives alone."""
  length, block = 200, 4
  q, k, v = make_inputs(22, length, batch=1)
  bias_fn = _bias_fn(length)
  fn = jax.jit(lambda q, k, v, seg: attention.hierarchical(
      q, k, v, level0_block=block, causal=causal, segment_ids=seg, bias_fn=bias_fn))
  # (offset, segment length): lengths around the level thresholds b 2^l, odd offsets.
  for offset, n in [(0, 200), (1, 150), (37, 129), (5, 33), (63, 65), (3, 17), (100, 100),
                    (199, 1)]:
    seg = np.zeros((1, length), np.int32)
    seg[0, :offset] = 1 + np.arange(offset) // 7  # several short segments before
    seg[0, offset:offset + n] = 100
    seg[0, offset + n:] = 0  # padding after
    packed = fn(q, k, v, jnp.asarray(seg))[:, offset:offset + n]
    part = lambda x: x[:, offset:offset + n]
    alone = fn(part(q), part(k), part(v), None)
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5, err_msg=f'{offset}, {n}')


def test_coarse_query_is_the_group_mean_or_its_first_query():
  """Token 127 (b = 8) scores its coarse keys with the queries of its groups
  [126, 128), [124, 128), [120, 128): causally their first queries (126, 124,
  120), bidirectionally their means. Query 121 is only in the level-3 group."""
  length, block = 128, 8
  q, k, v = make_inputs(23, length, batch=1)
  for causal in (True, False):
    fn = jax.jit(lambda q: attention.hierarchical(q, k, v, level0_block=block,
                                                  causal=causal)[:, 127])
    base = fn(q)
    moved = lambda *changes: fn(functools.reduce(lambda x, c: x.at[:, c[0]].add(c[1]),
                                                 changes, q))
    if causal:
      np.testing.assert_array_equal(moved((121, 1.0)), base)  # not a first query
      assert not np.allclose(moved((120, 1.0)), base, atol=1e-4)
    else:
      # The same level-3 mean: unchanged; a different mean: changed.
      np.testing.assert_allclose(moved((121, 1.0), (122, -1.0)), base, atol=1e-6)
      assert not np.allclose(moved((121, 1.0)), base, atol=1e-4)


def _intermediate_elements(kind, length, block=64):
  """Total elements of every array in the kernel's forward + backward jaxpr."""
  q, k, v = make_inputs(15, length, batch=1)
  loss = lambda q, k, v: jnp.sum(attention.get(kind)(q, k, v, level0_block=block, causal=True))
  return sum(intermediate_sizes(loss, q, k, v))


def test_intermediates_are_linear_in_length():
  """O(L b) in all: doubling the length (one more level) about doubles the
  total size of the intermediates; multiresolution's O(L b log(L/b)) grows more."""
  small, big = (_intermediate_elements('hierarchical', n) for n in (4096, 8192))
  assert big / small < 2.1, big / small
  small, big = (_intermediate_elements('multiresolution', n) for n in (4096, 8192))
  assert big / small > 2.1, big / small
