"""`chunked` is "split, attend, concatenate": with learned positions too, the
model over a whole input equals the same model run on each chunk alone."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax import models
from longjax.models import testing

CHUNK = testing.TINY_ATTENTION['chunk_size']


def tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 50, size=shape), jnp.int32)


def piecewise(fn, ids, chunk):
  """fn on each chunk of ids [b, l] (the last may be shorter), concatenated."""
  return np.concatenate([np.asarray(fn(ids[:, s:s + chunk]))
                         for s in range(0, ids.shape[1], chunk)], axis=1)


@pytest.mark.parametrize('positions', ['learned', 'rope', 't5_bias'])
@pytest.mark.parametrize('length', [12, 14])
def test_chunked_lm_equals_the_model_on_each_chunk(positions, length):
  model = models.build(testing.tiny_model_config('chunked', positions=positions),
                       rngs=nnx.Rngs(0))
  ids = tokens(1, (2, length))
  whole = np.asarray(model(ids)[0])
  np.testing.assert_allclose(whole, piecewise(lambda x: model(x)[0], ids, CHUNK), atol=1e-5)


def test_chunked_encoder_equals_the_encoder_on_each_chunk():
  config = testing.tiny_model_config('chunked', arch='encoder_decoder', num_decoder_layers=1,
                                     positions='learned')
  model = models.build(config, rngs=nnx.Rngs(0))
  ids = tokens(2, (2, 13))
  whole = np.asarray(model.encode(ids)[0])
  np.testing.assert_allclose(whole, piecewise(lambda x: model.encode(x)[0], ids, CHUNK),
                             atol=1e-5)


def test_chunked_mixed_with_other_kinds_refuses_learned_positions():
  with pytest.raises(ValueError) as error:
    testing.tiny_model_config('full', positions='learned',
                              attention=dict(layer_pattern=('chunked', 'local')))
  message = str(error.value)
  assert 'model.positions' in message and 'model.attention.layer_pattern' in message
  assert "'rope'" in message and "'t5_bias'" in message
  for positions in ('rope', 't5_bias'):  # the fix the message names
    testing.tiny_model_config('full', positions=positions,
                              attention=dict(layer_pattern=('chunked', 'local')))
  # Every layer chunked (a one-kind pattern) is the supported case.
  testing.tiny_model_config('full', positions='learned',
                            attention=dict(layer_pattern=('chunked', 'chunked')))
