"""Cross-layer sharing (model.share_layers, ALBERT): counts, equivalence, decoding.

Reference: the unshared model with every layer's weights set to its group's
first layer's — what sharing means — and the parameter-count formula.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax import models
from longjax.models import testing


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('arch, share', [('lm', 2), ('lm', 3), ('encoder_decoder', 2)])
def test_shared_model_is_the_unshared_one_with_tied_layers(arch, share):
  extra = dict(arch='encoder_decoder', positions='t5_bias') if arch != 'lm' else {}
  plain = testing.tiny_model_config('local', num_layers=4, tile_tokens=0, **extra)
  shared = dataclasses.replace(plain, share_layers=share)
  model = models.build(shared, rngs=nnx.Rngs(0))
  reference = models.build(plain, rngs=nnx.Rngs(1))
  # Parameters: one block per group of `share` layers.
  groups = -(-4 // share)
  stacks = [reference.decoder] + ([reference.encoder] if arch != 'lm' else [])
  saved = sum((4 - groups) * _count(nnx.state(stack.blocks[0], nnx.Param)) for stack in stacks)
  assert _count(nnx.state(model, nnx.Param)) == _count(nnx.state(reference, nnx.Param)) - saved
  # The same function as the unshared model with each layer's weights its group's.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tied = nnx.to_pure_dict(nnx.state(reference, nnx.Param))
  for stack in ('decoder', 'encoder') if arch != 'lm' else ('decoder',):
    for i in range(4):
      tied[stack]['blocks'][i] = params[stack]['blocks'][i // share]
    for name in tied[stack]:
      if name != 'blocks':
        tied[stack][name] = params[stack][name]
  tied['embedder'] = params['embedder']
  state = nnx.state(reference, nnx.Param)
  nnx.replace_by_pure_dict(state, tied)
  nnx.update(reference, state)
  tokens = jax.random.randint(jax.random.key(2), (2, 20), 3, plain.vocab_size)
  inputs = (tokens, tokens[:, :12]) if arch != 'lm' else (tokens,)
  np.testing.assert_array_equal(np.asarray(model(*inputs)[0]), np.asarray(reference(*inputs)[0]))


def test_shared_lm_decodes_as_it_computes():
  config = dataclasses.replace(testing.tiny_model_config('local', num_layers=4), share_layers=2)
  model = models.build(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 3, config.vocab_size)
  full, _ = model(tokens)
  first, caches = model.prefill(tokens[:, :8], jnp.array([8, 8]), max_length=16)
  np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, 7]), atol=1e-4)
  assert len(caches) == 4  # a cache per layer, though two blocks
  step, _ = model.decode_step(tokens[:, 8], jnp.array([8, 8]), caches)
  np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 8]), atol=1e-4)


def test_sharing_layers_of_different_kinds_is_refused():
  with pytest.raises(ValueError, match='model.share_layers: layers 0 and 1 share weights'):
    testing.tiny_model_config('local', num_layers=4, share_layers=2,
                              attention=dict(layer_pattern=('local', 'full')))
  testing.tiny_model_config('local', num_layers=4, share_layers=2,
                            attention=dict(layer_pattern=('local', 'local', 'full', 'full')))
  with pytest.raises(ValueError, match='model.share_layers: must be an int >= 1'):
    testing.tiny_model_config('local', share_layers=0)
