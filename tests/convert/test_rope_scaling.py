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
  assert attention_factor == 1.0  # these scalings leave the softmax temperature alone
  return inv_freq.numpy()


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
  expected = _reference(rope_scaling)
  got = layers.rope_frequencies(64, 500_000.0, **kwargs)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
  if kwargs['scaling'] == 'llama3':  # all three regions are present
    wavelength = 2 * np.pi / layers.rope_frequencies(64, 500_000.0)
    assert (wavelength < 8192 / 4).any() and (wavelength > 8192).any()
    assert ((wavelength >= 8192 / 4) & (wavelength <= 8192)).any()

