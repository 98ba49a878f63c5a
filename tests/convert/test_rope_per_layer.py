"""RoPE's base and scaling per layer type (model.rope_local_max_wavelength,
rope_scaling_local): windowed layers take theirs, the others the model's."""
import dataclasses

import numpy as np
from flax import nnx

from longjax import models
from longjax.models import layers, testing


def _frequencies(config):
  model = models.build(config, rngs=nnx.Rngs(0))
  return [np.asarray(block.attention.rope_frequencies()) for block in model.decoder.layers]


def test_local_layers_take_their_own_base_and_no_scaling():
  # Gemma 3's pattern: local layers at base 10k unscaled, global layers at 1M scaled 8x.
  config = testing.tiny_model_config('local', num_layers=3,
                                     attention=dict(layer_pattern=('local', 'local', 'full')))
  gemma = dataclasses.replace(config, rope_max_wavelength=1e6, rope_local_max_wavelength=1e4,
                              rope_scaling='linear', rope_scaling_factor=8.0,
                              rope_scaling_local=False)
  local, _, full = _frequencies(gemma)
  d = config.head_dim
  np.testing.assert_array_equal(local, layers.rope_frequencies(d, 1e4))
  np.testing.assert_array_equal(full, layers.rope_frequencies(d, 1e6, scaling='linear',
                                                              factor=8.0))
  # Defaults: every layer the same, as before.
  same = _frequencies(dataclasses.replace(gemma, rope_local_max_wavelength=-1.0,
                                          rope_scaling_local=True))
  assert all(np.array_equal(f, same[2]) for f in same)
