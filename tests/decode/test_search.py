"""The decoding loops: eos handling, sampling distributions, beam search against
exhaustive search, beam 1 = greedy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from longjax import decode
from longjax.decode import sampling, search
from tests.decode import helpers

EOS = 1


def test_each_row_stops_after_its_eos_and_the_loop_ends_early():
  vocab = 8
  stop_at = jnp.asarray([2, 5, 6])  # index of each row's eos
  start = jnp.asarray([4, 0, 10])

  def logits_of(index):  # token 3 + index % 4, or eos at stop_at
    token = jnp.where(index == stop_at, EOS, 3 + index % 4)
    return 10.0 * jax.nn.one_hot(token, vocab)

  def step_fn(tokens, positions, cache):
    index = positions - start + 1  # token i is fed at start + i
    return logits_of(index), dict(calls=cache['calls'] + 1, fed=cache['fed'].at[
        jnp.arange(3), positions - start].set(tokens))

  cache = dict(calls=jnp.zeros(3, jnp.int32), fed=jnp.full((3, 10), -1))
  out = search.sample_loop(step_fn, logits_of(jnp.zeros(3, jnp.int32)), cache,
                           start_positions=start, max_decode_len=10)
  expected = np.zeros((3, 10), np.int32)
  for r, stop in enumerate([2, 5, 6]):
    expected[r, :stop] = 3 + np.arange(stop) % 4
    expected[r, stop] = EOS
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, [3, 6, 7])
  # Every token was fed at its own position; the loop stopped once all rows
  # were done (7 steps, not 9).
  np.testing.assert_array_equal(out.cache['calls'], [7, 7, 7])
  np.testing.assert_array_equal(out.cache['fed'][:, :7], expected[:, :7])
  per_token = -np.log1p((vocab - 1) * np.exp(-10.0))  # log-softmax of the chosen token
  np.testing.assert_allclose(out.log_probs, per_token * np.array([3, 6, 7]), rtol=1e-3)


PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def sample_frequencies(count=20_000, **settings):
  logits = jnp.broadcast_to(jnp.log(PROBS), (count, len(PROBS)))
  tokens = sampling.sample_logits(logits, jax.random.key(0), **settings)
  return np.bincount(np.asarray(tokens), minlength=len(PROBS)) / count


@pytest.mark.parametrize('settings,expected', [
    (dict(temperature=1.0), PROBS),
    (dict(temperature=2.0), np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
    (dict(temperature=1.0, top_k=2), np.r_[PROBS[:2], 0, 0, 0, 0] / PROBS[:2].sum()),
    # Nucleus 0.7: 0.4 + 0.25 < 0.7, so 0.15 is needed too; 0.1 is not.
    (dict(temperature=1.0, top_p=0.7), np.r_[PROBS[:3], 0, 0, 0] / PROBS[:3].sum()),
    # top-p acts on the top-k renormalised: 0.4 / 0.8 + 0.25 / 0.8 > 0.75 (unlike 0.65).
    (dict(temperature=1.0, top_k=3, top_p=0.75), np.r_[0.4, 0.25, 0, 0, 0, 0] / 0.65),
    (dict(temperature=5.0, top_k=1), np.eye(6)[0]),
    (dict(temperature=0.0), np.eye(6)[0]),
])
def test_sampling_draws_from_the_filtered_distribution(settings, expected):
  frequencies = sample_frequencies(**settings)
  np.testing.assert_allclose(frequencies, expected, atol=0.015)
  assert (frequencies[expected == 0] == 0).all()


def test_top_p_keeps_the_smallest_nucleus_per_row():
  logits = jax.random.normal(jax.random.key(1), (16, 40)) * 3
  for top_p in (0.1, 0.5, 0.9, 0.99):
    kept = np.isfinite(sampling.filter_logits(logits, temperature=1.0, top_p=top_p))
    for row, row_logits in zip(kept, np.asarray(logits, np.float64)):
      probs = np.exp(row_logits - row_logits.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      size = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
      assert set(np.flatnonzero(row)) == set(order[:size].tolist())


def seq2seq_model(vocab, seed=0):
  config = helpers.tiny('local', arch='encoder_decoder', vocab_size=vocab, tie_embeddings=False,
                        attention=dict(decoder_kind='local'))
  return helpers.build(config, seed)


def test_wide_beam_search_equals_exhaustive_search():
  vocab, steps, alpha = 6, 3, 0.6  # 156 hypotheses of at most 3 tokens
  model = seq2seq_model(vocab)
  graphdef, params = helpers.split(model)
  source = helpers.tokens(8, (2, 7), high=vocab)
  segment_ids = np.ones_like(source)
  settings = decode.DecodeSettings(max_decode_len=steps, beam_size=160, length_penalty=alpha)
  out = decode.generate_seq2seq(graphdef, params, source, segment_ids, settings=settings)

  # Every hypothesis, scored from the teacher-forced forward pass.
  sequences = np.asarray(list(itertools.product(range(vocab), repeat=steps)), np.int32)
  decoder_inputs = np.concatenate([np.full((len(sequences), 1), 2), sequences[:, :-1]], axis=1)
  forward = helpers.forward(model)
  penalty = lambda length: ((5 + length) / 6) ** alpha
  for r in range(2):
    logits = forward(np.repeat(source[r:r + 1], len(sequences), 0),
                     np.repeat(segment_ids[r:r + 1], len(sequences), 0), decoder_inputs)
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    lp = np.take_along_axis(log_probs, sequences[..., None], -1)[..., 0]
    hypotheses = {}
    for seq, seq_lp in zip(sequences, lp):
      eos = np.flatnonzero(seq == EOS)
      end = eos[0] + 1 if len(eos) else steps
      hypotheses[tuple(seq[:end])] = seq_lp[:end].sum() / penalty(end)
    ranked = sorted(hypotheses.items(), key=lambda item: -item[1])
    assert len(ranked) == 1 + 5 + 25 + 125
    found = np.asarray(out.beam_scores[r])
    np.testing.assert_allclose(found[:len(ranked)], [score for _, score in ranked], rtol=1e-4)
    assert (found[len(ranked):] < -1e8).all()
    best = np.asarray(out.tokens[r])
    assert tuple(best[:int(out.lengths[r])]) == ranked[0][0]


def beam_search_of(graphdef, decoder_fn, beam_size, max_decode_len):
  """search.beam_search run directly (generate takes beam_size 1 to mean greedy)."""
  @jax.jit
  def run(params, alpha, *inputs):
    decoder = decoder_fn(nnx.merge(graphdef, params), *inputs, max_decode_len=max_decode_len)
    return search.beam_search(decoder.step_fn, decoder.first_logits, decoder.caches,
                              start_positions=decoder.start_positions, beam_size=beam_size,
                              max_decode_len=max_decode_len, alpha=alpha)
  return run


def test_beam_search_with_one_beam_equals_greedy():
  model = seq2seq_model(vocab=8, seed=1)
  # A larger eos readout makes eos likely, so that rows end at different steps.
  model.embedder.head[...] = model.embedder.head[...].at[:, EOS].multiply(5.0)
  graphdef, params = helpers.split(model)
  source = helpers.tokens(9, (6, 11), high=8)
  segment_ids = (np.arange(11)[None] < np.array([[11], [5], [8], [11], [3], [9]])).astype(np.int32)
  greedy = decode.generate_seq2seq(graphdef, params, source, segment_ids,
                                   settings=decode.DecodeSettings(max_decode_len=12))
  lengths = np.asarray(greedy.lengths)
  assert len(set(lengths.tolist())) >= 3  # rows end at different steps
  beam_one = beam_search_of(graphdef, decode.seq2seq_decoder, 1, 12)
  for alpha in (0.0, 0.6, 2.0):
    beams = beam_one(params, alpha, source, segment_ids)
    np.testing.assert_array_equal(beams.tokens[:, 0], greedy.tokens)
    np.testing.assert_array_equal(beams.lengths[:, 0], lengths)
    np.testing.assert_allclose(beams.scores[:, 0],
                               greedy.scores / search.length_penalty(lengths, alpha), rtol=1e-5)


def test_lm_beam_search_scores_are_the_models_log_probabilities():
  """Checks the cache reordering between beams: each beam's score is recomputed
  from the teacher-forced forward pass over its own tokens."""
  config = helpers.tiny('global_local', vocab_size=8, tie_embeddings=False)
  model = helpers.build(config, seed=5)
  graphdef, params = helpers.split(model)
  prompt = helpers.tokens(10, (3, 9), high=8)
  lengths = np.array([9, 4, 6])
  settings = decode.DecodeSettings(max_decode_len=10, beam_size=4,
                                   length_penalty=0.0)  # score = log-probability
  beams = decode.generate(graphdef, params, prompt, lengths, settings=settings)
  # All 12 hypotheses in one teacher-forced batch, right-padded (the LM is causal).
  seqs = np.zeros((3, 4, 9 + 10), np.int32)
  for r in range(3):
    seqs[r, :, :lengths[r]] = prompt[r, :lengths[r]]
    seqs[r, :, lengths[r]:lengths[r] + 10] = beams.beams[r]
  log_probs = np.asarray(jax.nn.log_softmax(helpers.forward(model)(seqs.reshape(12, -1))))
  log_probs = log_probs.reshape(3, 4, 19, -1)
  for r in range(3):
    for b, (tokens, score) in enumerate(zip(np.asarray(beams.beams[r]),
                                            np.asarray(beams.beam_scores[r]))):
      eos = np.flatnonzero(tokens == EOS)
      end = eos[0] + 1 if len(eos) else len(tokens)
      steps = log_probs[r, b, lengths[r] - 1:lengths[r] - 1 + end]
      want = np.take_along_axis(steps, tokens[:end, None], 1).sum()
      np.testing.assert_allclose(score, want, rtol=1e-4)
  assert np.all(np.diff(np.asarray(beams.beam_scores), axis=1) <= 0)  # best first


def test_beam_search_rejects_sampling_settings():
  with pytest.raises(ValueError, match='beam search'):
    decode.DecodeSettings(beam_size=4, temperature=0.7).validate()
  with pytest.raises(ValueError, match='top_p'):
    decode.DecodeSettings(top_p=0.0).validate()


def test_generation_longer_than_max_len_names_the_field():
  graphdef, params = helpers.split(helpers.build(helpers.tiny('local', max_len=32)))
  with pytest.raises(ValueError, match=r'model\.max_len'):
    decode.generate(graphdef, params, helpers.tokens(0, (1, 20)),
                    settings=decode.DecodeSettings(max_decode_len=14))
