"""Properties every kernel must have, checked by perturbing inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import attention
from tests.attention.cases import CASES, intermediate_sizes, make_inputs, make_segments

LENGTH = 150  # several windows, blocks and levels of every case's settings


def test_registry_lists_every_kind():
  assert set(attention.KINDS) == {case.kind for case in CASES.values()}
  for kind in attention.KINDS:
    assert callable(attention.get(kind))
  with pytest.raises(ValueError, match='valid kinds are: full, local, global_local'):
    attention.get('sparse')


def test_every_registry_entry_is_complete():
  """A kind's entry names settings the config holds and the checks know, and a decode rule."""
  from longjax.models import config as model_config  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in model_config.dataclasses.fields(model_config.AttentionConfig)}
  for kind in attention.KINDS:
    spec = attention.spec(kind)
    assert spec.name == kind and spec.fn is attention.get(kind)
    assert set(spec.params) <= set(attention.PARAMS) and set(spec.params) <= fields, kind
    assert 'xla' in spec.implementations, kind
    layout = spec.cache_layout(spec.settings(model_config.AttentionConfig()), 100)
    assert layout.slots >= 1 and layout.pinned <= 100 and layout.ring <= 100, kind
    assert len(layout.pool_sizes) == len(layout.pool_slots), kind


def test_setting_checks_name_the_problem():
  problems = attention.spec('hierarchical').problems(dict(level0_block=5))
  assert problems == {'level0_block': 'must be even (each level halves it); got 5.'}
  assert attention.spec('local').problems(dict(radius=0)) == {'radius': 'must be >= 1; got 0.'}
  assert 'span_ramp' in attention.spec('adaptive_span').problems(dict(max_span=8, span_ramp=0.0))
  assert not attention.spec('global_local').problems(dict(radius=4, num_global=0))


@pytest.mark.parametrize('segments', [False, True], ids=['noseg', 'seg'])
@pytest.mark.parametrize('kind', sorted(CASES))
def test_causal_output_never_sees_the_future(kind, segments):
  fn = jax.jit(lambda q, k, v, seg: CASES[kind].kernel(q, k, v, True, seg))
  q, k, v = make_inputs(11, LENGTH)
  seg = make_segments(11, LENGTH) if segments else None
  base = fn(q, k, v, seg)
  rng = np.random.default_rng(0)
  for t in (1, 37, 64, 100, LENGTH - 1):
    noise = lambda x: x.at[:, t:].set(jnp.asarray(rng.normal(size=x[:, t:].shape), x.dtype))
    changed = fn(noise(q), noise(k), noise(v), seg)
    np.testing.assert_array_equal(changed[:, :t], base[:, :t], err_msg=f'{kind}: t={t}')
    assert not np.allclose(changed[:, t:], base[:, t:]), 'the perturbation must matter'


@pytest.mark.parametrize('kind,radius', [('local_r20', 20), ('adaptive_span', 12)])
def test_local_output_ignores_keys_beyond_radius(kind, radius):
  fn = jax.jit(lambda q, k, v: CASES[kind].kernel(q, k, v, False, None))
  q, k, v = make_inputs(12, LENGTH)
  base = fn(q, k, v)
  rng = np.random.default_rng(1)
  for j in (0, 40, 75, LENGTH - 1):
    changed = fn(q, k.at[:, j].set(rng.normal(size=k[:, j].shape)),
                 v.at[:, j].set(rng.normal(size=v[:, j].shape)))
    far = np.abs(np.arange(LENGTH) - j) > radius
    np.testing.assert_array_equal(changed[:, far], base[:, far])
    assert not np.allclose(changed[:, ~far], base[:, ~far])


@pytest.mark.parametrize('kind', ['hierarchical', 'multiresolution'])
def test_hierarchical_is_full_attention_when_one_block_covers_the_input(kind):
  q, k, v = make_inputs(13, 61)
  seg = make_segments(13, 61)
  for causal in (False, True):
    full = attention.dot_product(q, k, v, causal=causal, segment_ids=seg)
    for block_size in (62, 64, 200):
      got = attention.get(kind)(q, k, v, level0_block=block_size, causal=causal,
                                segment_ids=seg)
      np.testing.assert_allclose(got, full, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize('kind', ['hierarchical', 'multiresolution'])
def test_hierarchical_uses_coarse_keys_for_far_tokens(kind):
  """Far away only a group's mean matters: swapping two values inside a far
  group leaves the output unchanged; swapping two near values does not."""
  q, k, v = make_inputs(14, 128)
  fn = jax.jit(lambda v: attention.get(kind)(q, k, v, level0_block=8))
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
  loss = lambda q, k, v: jnp.sum(CASES[kind].kernel(q, k, v, True, None))
  return max(intermediate_sizes(loss, q, k, v))


def test_full_attention_builds_length_squared_scores():
  # Validates the check below: dense attention does build [heads, L, L].
  assert _largest_intermediate('full') >= 4 * 2048 * 2048


@pytest.mark.parametrize('kind', ['local_r20', 'global_local', 'hierarchical', 'multiresolution',
                                  'adaptive_span', 'chunked'])
def test_no_length_squared_array_in_forward_or_backward(kind):
  """Linear kinds build nothing near [heads, length, length] (here 16.8M elements)."""
  biggest = _largest_intermediate(kind)
  assert biggest < 4 * 2048 * 2048 / 8, f'{kind}: an array of {biggest} elements'
