"""Properties every kernel must have, checked by perturbing inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import attention
from tests.attention.test_kernels import make_inputs, make_segments

LENGTH = 150

# Settings that make each kind look far (several blocks / levels at LENGTH).
KERNELS = {
    'full': lambda q, k, v, **kw: attention.dot_product(q, k, v, **kw),
    'local': lambda q, k, v, **kw: attention.local(q, k, v, radius=7, **kw),
    'global_local': lambda q, k, v, **kw: attention.global_local(q, k, v, radius=7, num_global=4, **kw),
    'transient_global': lambda q, k, v, **kw: attention.transient_global(
        q, k, v, radius=7, block_size=8, **kw),
    'hierarchical': lambda q, k, v, **kw: attention.hierarchical(q, k, v, block_size=8, **kw),
    'adaptive_span': lambda q, k, v, **kw: attention.adaptive_span(
        q, k, v, spans=jnp.array([2.0, 5.0, 11.0, 30.0]), max_span=32, ramp=8.0, **kw),
    'chunked': lambda q, k, v, **kw: attention.chunked(q, k, v, block_size=16, **kw),
}


def test_registry_lists_every_kind():
  assert set(attention.KINDS) == set(KERNELS)
  for kind in attention.KINDS:
    assert callable(attention.get(kind))
  with pytest.raises(ValueError, match='valid kinds are: full, local, global_local'):
    attention.get('sparse')


@pytest.mark.parametrize('segments', [False, True], ids=['noseg', 'seg'])
@pytest.mark.parametrize('kind', sorted(KERNELS))
def test_causal_output_never_sees_the_future(kind, segments):
  fn = jax.jit(lambda q, k, v, seg: KERNELS[kind](q, k, v, causal=True, segment_ids=seg))
  q, k, v = make_inputs(11, LENGTH)
  seg = make_segments(11, LENGTH) if segments else None
  base = fn(q, k, v, seg)
  rng = np.random.default_rng(0)
  for t in (1, 37, 64, 100, LENGTH - 1):
    noise = lambda x: x.at[:, t:].set(jnp.asarray(rng.normal(size=x[:, t:].shape), x.dtype))
    changed = fn(noise(q), noise(k), noise(v), seg)
    np.testing.assert_array_equal(changed[:, :t], base[:, :t], err_msg=f'{kind}: t={t}')
    assert not np.allclose(changed[:, t:], base[:, t:]), 'the perturbation must matter'


@pytest.mark.parametrize('kind', ['local', 'adaptive_span'])
def test_local_output_ignores_keys_beyond_radius(kind):
  radius = 7 if kind == 'local' else 32
  fn = jax.jit(lambda q, k, v: KERNELS[kind](q, k, v, causal=False))
  q, k, v = make_inputs(12, LENGTH)
  base = fn(q, k, v)
  rng = np.random.default_rng(1)
  for j in (0, 40, 75, LENGTH - 1):
    changed = fn(q, k.at[:, j].set(rng.normal(size=k[:, j].shape)),
                 v.at[:, j].set(rng.normal(size=v[:, j].shape)))
    far = np.abs(np.arange(LENGTH) - j) > radius
    np.testing.assert_array_equal(changed[:, far], base[:, far])
    assert not np.allclose(changed[:, ~far], base[:, ~far])


def test_hierarchical_is_full_attention_when_one_block_covers_the_input():
  q, k, v = make_inputs(13, 61)
  seg = make_segments(13, 61)
  for causal in (False, True):
    full = attention.dot_product(q, k, v, causal=causal, segment_ids=seg)
    for block_size in (62, 64, 200):
      got = attention.hierarchical(q, k, v, block_size=block_size, causal=causal, segment_ids=seg)
      np.testing.assert_allclose(got, full, atol=2e-6, rtol=2e-6)


def test_hierarchical_uses_coarse_keys_for_far_tokens():
  """Far away only a group's mean matters: swapping two values inside a far
  group leaves the output unchanged; swapping two near values does not."""
  q, k, v = make_inputs(14, 128)
  fn = jax.jit(lambda v: attention.hierarchical(q, k, v, block_size=8))
  base = fn(v)
  # Query 127: level-0 region [112, 136) is exact, R_1 = [96, 160),
  # R_2 = [64, 192), R_3 = [0, 256): tokens 0..63 are seen as means of 8.
  def swap(a, b):
    perm = np.arange(128)
    perm[[a, b]] = perm[[b, a]]
    return fn(v[:, perm])[:, 127]
  np.testing.assert_allclose(swap(0, 7), base[:, 127], atol=1e-6)
  assert not np.allclose(swap(7, 8), base[:, 127], atol=1e-4)  # two different groups
  assert not np.allclose(swap(120, 124), base[:, 127], atol=1e-4)


def _largest_intermediate(kind, length=2048):
  """Most elements of any array in the jaxpr of the kernel's forward + backward."""
  q, k, v = make_inputs(15, length, batch=1)
  loss = lambda q, k, v: jnp.sum(KERNELS[kind](q, k, v, causal=True))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  biggest = 0

  def visit(jaxpr):
    nonlocal biggest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(var.aval, 'shape', ()))))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if hasattr(sub, 'eqns'):
            visit(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            visit(sub.jaxpr)

  visit(jaxpr.jaxpr)
  return biggest


def test_full_attention_builds_length_squared_scores():
  # Validates the check below: dense attention does build [heads, L, L].
  assert _largest_intermediate('full') >= 4 * 2048 * 2048


@pytest.mark.parametrize('kind', ['local', 'global_local', 'hierarchical', 'adaptive_span',
                                  'chunked'])
def test_no_length_squared_array_in_forward_or_backward(kind):
  """Linear kinds build nothing near [heads, length, length] (here 16.8M elements)."""
  biggest = _largest_intermediate(kind)
  assert biggest < 4 * 2048 * 2048 / 8, f'{kind}: an array of {biggest} elements'
