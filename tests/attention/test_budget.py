"""Each kind's `keys_per_query` against what its kernel computes.

The reference is the kernel itself, read through autodiff: out_i = sum_s p_is
V_s over the slots s query i attends, so d out_i / d v_j is p_is for every
token j that slot s holds (a pooled key's tokens share its value, v being their
sum or mean). The number of distinct non-zero values of that row, with random
inputs, is the number of slots query i scores — counted from the kernel's
output, not from the visibility rules `keys_per_query` is written with.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import attention

LENGTH = 128
SETTINGS = dict(radius=8, num_global=3, summary_block=8, level0_block=8, chunk_size=16,
                max_span=8, span_ramp=2.0)


def _kernel_inputs(kind, length, key):
  kq, kk, kv, ks, kt = jax.random.split(key, 5)
  shape = (1, length, 1, 4)
  q, k, v = (jax.random.normal(x, shape) for x in (kq, kk, kv))
  extra = {}
  if kind == 'transient_global':
    slots = length // SETTINGS['summary_block']
    extra = dict(summary_k=jax.random.normal(ks, (1, slots, 1, 4)),
                 summary_v=jax.random.normal(kt, (1, slots, 1, 4)))
  if kind == 'adaptive_span':
    extra = dict(spans=jnp.full((1,), float(SETTINGS['max_span'])))
  return q, k, v, extra


def counted_slots(kind: str, length: int, causal: bool) -> int:
  """Distinct non-zero d out[query] / d (values, summary values) of the kernel."""
  kind_spec = attention.spec(kind)
  q, k, v, extra = _kernel_inputs(kind, length, jax.random.key(0))
  query = attention.budget_query(length, causal)
  settings = kind_spec.settings(SETTINGS)

  def out(v, extra):
    return kind_spec.fn(q, k, v, causal=causal, **settings, **extra)[0, query, 0, 0]

  grad_v, grad_extra = jax.grad(out, argnums=(0, 1))(v, extra)
  values = [np.asarray(grad_v[0, :, 0, 0])]
  if 'summary_v' in grad_extra:
    values.append(np.asarray(grad_extra['summary_v'][0, :, 0, 0]))
  values = np.concatenate(values)
  return len(np.unique(values[values != 0]))


@pytest.mark.parametrize('causal', [False, True], ids=['bidirectional', 'causal'])
@pytest.mark.parametrize('kind', attention.KINDS)
def test_keys_per_query_counts_the_slots_the_kernel_scores(kind, causal):
  kind_spec = attention.spec(kind)
  expected = counted_slots(kind, LENGTH, causal)
  assert kind_spec.keys_per_query(kind_spec.settings(SETTINGS), LENGTH, causal) == expected


def test_closed_forms_of_the_windowed_kinds():
  # The papers' budgets, written out: a window of 2r + 1 (causal r + 1), plus g
  # globals (Longformer), plus L / k summaries (LongT5; causal: blocks ended).
  r, g, k, length = 8, 3, 8, LENGTH
  keys = lambda kind, causal: attention.spec(kind).keys_per_query(SETTINGS, length, causal)
  assert (keys('local', False), keys('local', True)) == (2 * r + 1, r + 1)
  assert (keys('global_local', False), keys('global_local', True)) == (2 * r + 1 + g, r + 1 + g)
  assert keys('transient_global', False) == 2 * r + 1 + length // k
  assert keys('transient_global', True) == r + 1 + (length - 1) // k
  assert keys('chunked', False) == keys('chunked', True) == SETTINGS['chunk_size']
  assert keys('full', True) == length
