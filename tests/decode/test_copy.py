"""A tiny encoder-decoder trained to copy decodes its input exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longjax import decode
from tests.decode import helpers

SOURCE_LEN = 10  # up to 9 symbols, then eos
VOCAB = 16       # pad, eos, bos and 13 symbols


def copy_batch(rng, batch):
  """Sources of 4-9 random symbols + eos; the target is the same sequence."""
  lengths = rng.integers(4, SOURCE_LEN, size=batch)
  position = np.arange(SOURCE_LEN)[None]
  source = rng.integers(3, VOCAB, size=(batch, SOURCE_LEN))
  source = np.where(position < lengths[:, None], source, 0)
  source = np.where(position == lengths[:, None], 1, source).astype(np.int32)
  segment_ids = (position <= lengths[:, None]).astype(np.int32)
  decoder_inputs = np.concatenate([np.full((batch, 1), 2), source[:, :-1]], axis=1)
  decoder_inputs = (decoder_inputs * (position <= lengths[:, None])).astype(np.int32)
  return source, segment_ids, decoder_inputs


def train_copy_model(steps=300):
  # Learned (absolute) positions let cross-attention find the position to copy.
  config = helpers.tiny('full', arch='encoder_decoder', emb_dim=64, mlp_dim=128,
                        vocab_size=VOCAB, max_len=32, positions='learned',
                        attention=dict(decoder_kind='local'))
  model = helpers.build(config)
  graphdef, params = helpers.split(model)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, source, segment_ids, decoder_inputs):
    def loss_fn(params):
      logits, _ = nnx.merge(graphdef, params)(source, decoder_inputs,
                                              inputs_segment_ids=segment_ids,
                                              decoder_segment_ids=segment_ids)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), source[..., None], -1)[..., 0]
      return jnp.sum(nll * segment_ids) / jnp.sum(segment_ids)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for _ in range(steps):
    params, opt_state, loss = train_step(params, opt_state, *copy_batch(rng, 32))
  return graphdef, params, float(loss)


def test_a_model_trained_to_copy_decodes_its_input_exactly():
  graphdef, params, loss = train_copy_model()
  assert loss < 0.05
  source, segment_ids, _ = copy_batch(np.random.default_rng(1), 24)  # unseen sources
  lengths = segment_ids.sum(axis=1)  # symbols + eos
  outputs = {}
  for beam_size in (1, 4):
    out = decode.generate_seq2seq(graphdef, params, source, segment_ids,
                                  settings=decode.DecodeSettings(max_decode_len=SOURCE_LEN + 2,
                                                                 beam_size=beam_size))
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(out.lengths, lengths)  # stopped right after eos
    for r in range(len(source)):
      np.testing.assert_array_equal(tokens[r, :lengths[r]], source[r, :lengths[r]])
      assert (tokens[r, lengths[r]:] == 0).all()
    outputs[beam_size] = tokens
  np.testing.assert_array_equal(outputs[4], outputs[1])
