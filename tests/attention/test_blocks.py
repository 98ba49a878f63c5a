"""The blocked softmax part's recomputing backward (`_blocks.attend_blocks`).

Its gradients are compared with jax autodiff of the part's equations written
out here (scores, mask, exp, weighted sums, independent of longjax's code),
with and without chunking, on every optional input and broadcast shape the
kernels use; and its saved state is measured: the compiled gradient holds no
[queries, keys] float32 tiles across the two passes.
"""

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.attention import _blocks

B, HK, N, G, TQ, TK, D = 2, 2, 4, 2, 8, 12, 16


def _independent_part(q, k, v, mask, bias, log_weight, weight):
  """The part's statistics from its definition (see _core's module docstring)."""
  s = jnp.einsum('bhngqd,bhnkd->bhngqk', q, k)
  if bias is not None:
    s = s + bias
  if log_weight is not None:
    s = s + log_weight
  s = jnp.where(mask, s, -1e30)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(m > -5e29, m, 0.0)
  p = jnp.exp(s - m)
  if weight is not None:
    p = p * weight
  out = jnp.einsum('bhngqk,bhnkd->bhngqd', p, v)
  return jnp.sum(p, axis=-1), out


def _rows(x):  # block-major rows, as attend_blocks returns them
  b, hk, n, g, tq = x.shape[:5]
  return jnp.swapaxes(x, 2, 3).reshape((b, hk, g, n * tq) + x.shape[5:])


def _inputs(n=N, tq=TQ, kv_blocks=None, bias_shape=(1, HK, 1, G, TQ, TK),
            weight_shape=(1, HK, 1, G, TQ, TK), log_weight_shape=(B, 1, N, 1, 1, TK)):
  keys = iter(jax.random.split(jax.random.key(0), 8))
  kv_blocks = n if kv_blocks is None else kv_blocks
  q = jax.random.normal(next(keys), (B, HK, n, G, tq, D))
  k = jax.random.normal(next(keys), (B, HK, kv_blocks, TK, D))
  v = jax.random.normal(next(keys), (B, HK, kv_blocks, TK, D))
  mask = jax.random.bernoulli(next(keys), 0.7, (B, 1, n, 1, tq, TK))
  mask = mask.at[0, 0, 0, 0, 0].set(False)  # a row that sees no key
  bias_shape = bias_shape[:4] + (tq,) + bias_shape[5:] if bias_shape[4] == TQ else bias_shape
  weight_shape = weight_shape[:4] + (tq,) + weight_shape[5:] if weight_shape[4] == TQ else weight_shape
  bias = jax.random.normal(next(keys), bias_shape)
  log_weight = jnp.log(jax.random.uniform(next(keys), log_weight_shape, minval=0.5, maxval=4))
  weight = jax.random.uniform(next(keys), weight_shape)
  return q, k, v, mask, bias, log_weight, weight


def _loss(part_fn, cot_sum, cot_out):
  def loss(q, k, v, bias, log_weight, weight, mask):
    row_sum, out = part_fn(q, k, v, mask, bias, log_weight, weight)
    return jnp.sum(row_sum * cot_sum) + jnp.sum(out * cot_out)
  return loss


def _longjax_part(q, k, v, mask, bias, log_weight, weight):
  part = _blocks.attend_blocks(q, k, v, mask=mask, bias=bias, log_weight=log_weight,
                               weight=weight)
  return part.sum, part.out


def _independent(q, k, v, mask, bias, log_weight, weight):
  row_sum, out = _independent_part(q, k, v, mask, bias, log_weight, weight)
  return _rows(row_sum), _rows(out)


def _check(inputs, chunk_scores, monkeypatch, use=('bias', 'log_weight', 'weight')):
  q, k, v, mask, bias, log_weight, weight = inputs
  extras = {'bias': bias, 'log_weight': log_weight, 'weight': weight}
  extras = {name: x if name in use else None for name, x in extras.items()}
  monkeypatch.setattr(_blocks, 'CHUNK_SCORES', chunk_scores)
  n, tq = q.shape[2], q.shape[4]
  cot_sum = jax.random.normal(jax.random.key(5), (B, HK, G, n * tq))
  cot_out = jax.random.normal(jax.random.key(6), (B, HK, G, n * tq, D))
  args = (q, k, v, extras['bias'], extras['log_weight'], extras['weight'], mask)
  want_sum, want_out = _independent(q, k, v, mask, *args[3:6])
  got_sum, got_out = jax.jit(_longjax_part)(q, k, v, mask, *args[3:6])
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
  diff = [i for i, x in enumerate(args[:6]) if x is not None]
  grad = lambda fn: jax.jit(jax.grad(_loss(fn, cot_sum, cot_out), argnums=diff))(*args)
  for i, g, w in zip(diff, grad(_longjax_part), grad(_independent)):
    assert g.shape == w.shape, (i, g.shape, w.shape)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f'input {i}')


@pytest.mark.parametrize('chunk_scores', [1 << 30, B * HK * G * TQ * TK * 2],
                         ids=['one_chunk', 'two_block_chunks'])
def test_gradients_equal_autodiff_of_the_equations(chunk_scores, monkeypatch):
  _check(_inputs(), chunk_scores, monkeypatch)


@pytest.mark.parametrize('use', [(), ('bias',), ('weight',), ('log_weight',)])
def test_optional_inputs(use, monkeypatch):
  _check(_inputs(), B * HK * G * TQ * TK, monkeypatch, use=use)


def test_chunks_over_query_rows_with_one_block(monkeypatch):
  # One block of all queries against shared keys (TGlobal's summaries): the
  # query rows are chunked and the keys' gradients summed over the chunks.
  inputs = _inputs(n=1, tq=32, bias_shape=(1, HK, 1, G, 1, TK),
                   weight_shape=(1, 1, 1, 1, 1, TK), log_weight_shape=(B, 1, 1, 1, 1, TK))
  assert _blocks._plan(B * HK * G * 32 * TK, 1, 32).chunks == 1
  _check(inputs, B * HK * G * 8 * TK, monkeypatch)
  assert _blocks._plan(B * HK * G * 32 * TK, 1, 32) == _blocks._Plan(4, 4)


def test_broadcast_keys_over_blocks(monkeypatch):
  # Keys shared by every block (global tokens): one key block, n query blocks.
  _check(_inputs(kv_blocks=1), B * HK * G * TQ * TK * 2, monkeypatch)


def _saved_shapes(fn, *args):
  """The shapes autodiff saves from fn's forward for its backward pass
  (jax.ad_checkpoint.print_saved_residuals, parsed: 'f32[1,4,64] from ...')."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  shapes = []
  for line in out.getvalue().splitlines():
    dims = re.match(r'\w+\[([\d,]*)\]', line).group(1)
    shapes.append(tuple(int(x) for x in dims.split(',') if x))
  return shapes


@pytest.mark.parametrize('chunk_scores', [1 << 30, 1 << 12], ids=['one_chunk', 'chunks'])
def test_saves_no_score_tiles(chunk_scores, monkeypatch):
  """FlashAttention's saved state: autodiff of the equations saves the
  [b, hk, n, g, tq, tk] tiles (scores, probabilities) for the backward; the
  recomputing VJP saves its inputs only."""
  monkeypatch.setattr(_blocks, 'CHUNK_SCORES', chunk_scores)
  q, k, v, mask, bias, log_weight, weight = _inputs()
  loss = lambda part_fn: lambda q, k, v, bias, weight: jnp.sum(
      part_fn(q, k, v, mask, bias, log_weight, weight)[1])
  tiles = (B, HK, N, G, TQ, TK)
  assert tiles in _saved_shapes(loss(_independent), q, k, v, bias, weight)
  saved = _saved_shapes(loss(_longjax_part), q, k, v, bias, weight)
  inputs = {x.shape for x in (q, k, v, mask, bias, log_weight, weight)}
  assert tiles not in saved and set(saved) <= inputs, saved


def test_plan_bounds_each_chunk():
  elements = 1 * 4 * 8192 * 1 * 128 * 256  # 1M tokens, radius-128 windows, 4 heads
  plan = _blocks._plan(elements, 8192, 128)
  assert plan.axis == 2 and 8192 % plan.chunks == 0
  assert elements // plan.chunks <= _blocks.CHUNK_SCORES
  assert elements // (plan.chunks - 1) > _blocks.CHUNK_SCORES or plan.chunks == 1
