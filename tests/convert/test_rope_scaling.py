"""RoPE frequencies with context-extension scaling against transformers' rope_utils."""
import numpy as np
import pytest

from longjax.models import layers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top


def _reference(rope_scaling, head_dim=64, theta=500_000.0):
  config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                                    rope_theta=theta, rope_scaling=rope_scaling,
                                    max_position_embeddings=131072)
  kind = rope_scaling['rope_type'] if rope_scaling else 'default'
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](config, 'cpu')
  return inv_freq.numpy(), attention_factor


@pytest.mark.parametrize('rope_scaling, kwargs', [
    (None, dict(scaling='none')),
    (dict(rope_type='linear', factor=4.0), dict(scaling='linear', factor=4.0)),
    (dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192),
     dict(scaling='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_len=8192)),
    (dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192),  # Llama 3.2's factor
     dict(scaling='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_len=8192)),
])
def test_rope_frequencies_equal_transformers(rope_scaling, kwargs):
  expected, _ = _reference(rope_scaling)
  got = layers.rope_frequencies(64, 500_000.0, **kwargs)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
  if kwargs['scaling'] == 'llama3':  # all three regions are present
    wavelength = 2 * np.pi / layers.rope_frequencies(64, 500_000.0)
    assert (wavelength < 8192 / 4).any() and (wavelength > 8192).any()
    assert ((wavelength >= 8192 / 4) & (wavelength <= 8192)).any()
  assert layers.rope_attention_factor(kwargs['scaling'], kwargs.get('factor', 1.0)) == 1.0


@pytest.mark.parametrize('yarn', [
    dict(factor=4.0, original_max_position_embeddings=4096),
    dict(factor=16.0, original_max_position_embeddings=2048, beta_fast=16.0, beta_slow=2.0),
    dict(factor=8.0, original_max_position_embeddings=4096, attention_factor=1.5),
])
def test_yarn_frequencies_and_temperature_equal_transformers(yarn):
  expected, temperature = _reference(dict(rope_type='yarn', **yarn))
  got = layers.rope_frequencies(64, 500_000.0, scaling='yarn', factor=yarn['factor'],
                                original_max_len=yarn['original_max_position_embeddings'],
                                beta_fast=yarn.get('beta_fast', 32.0),
                                beta_slow=yarn.get('beta_slow', 1.0))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
  assert layers.rope_attention_factor('yarn', yarn['factor'], yarn.get('attention_factor', -1.0)
                                      ) == pytest.approx(temperature, rel=1e-12)
  kept, scaled = got == layers.rope_frequencies(64, 500_000.0), got < layers.rope_frequencies(
      64, 500_000.0)
  assert kept.any() and scaled.any()  # both ends of the ramp are present



@pytest.mark.parametrize('length', [1000, 4096, 8192, 40_000])
def test_dynamic_ntk_frequencies_equal_transformers(length):
  # transformers computes them for max(length, max_position_embeddings), the original.
  config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500_000.0,
                                    rope_scaling=dict(rope_type='dynamic', factor=4.0),
                                    max_position_embeddings=4096)
  expected, _ = ROPE_INIT_FUNCTIONS['dynamic'](config, 'cpu', seq_len=length)
  got = layers.rope_frequencies(64, 500_000.0, scaling='dynamic', factor=4.0,
                                original_max_len=4096, length=length)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=0)
  unscaled = layers.rope_frequencies(64, 500_000.0)
  assert np.array_equal(got, unscaled) == (length <= 4096)
