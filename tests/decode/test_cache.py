"""Cached decoding equals the model's own forward pass, for every attention kind,
and the rolling caches stay the same size however long the generation."""
import re

import jax
import numpy as np
import pytest

from longjax import attention, decode
from longjax.models import cache as kv_cache
from tests.decode import helpers

PROMPT_LENGTHS = np.array([13, 9, 1])  # ragged; 13 > every window, 1 = bos alone
STEPS = 20                             # 33 positions: several laps of every ring


def teacher_forced_logits(model, prompt, lengths, generated):
  """Forward over prompt + generated tokens; the logits that chose each generated token."""
  batch, steps = generated.shape
  seq = np.zeros((batch, prompt.shape[1] + steps), np.int32)
  for r in range(batch):
    seq[r, :lengths[r]] = prompt[r, :lengths[r]]
    seq[r, lengths[r]:lengths[r] + steps] = generated[r]
  logits = np.asarray(helpers.forward(model)(seq))
  return np.stack([logits[r, lengths[r] - 1:lengths[r] - 1 + steps] for r in range(batch)])


# (pinned, ring) slots of the rolling caches with helpers.ATTENTION.
RING_SLOTS = {'local': (0, 5), 'global_local': (2, 5), 'adaptive_span': (0, 9), 'chunked': (0, 4),
              'transient_global': (0, 5), 'hierarchical': (0, 8), 'multiresolution': (0, 8)}

CASES = [
    ('full', 'rope'), ('local', 'rope'), ('local', 't5_bias'), ('global_local', 'rope'),
    ('global_local', 't5_bias'), ('transient_global', 'rope'), ('transient_global', 't5_bias'),
    ('hierarchical', 'rope'), ('hierarchical', 't5_bias'), ('multiresolution', 'rope'),
    ('multiresolution', 't5_bias'), ('adaptive_span', 't5_bias'),
    ('chunked', 'learned'),
]


def test_cases_cover_every_kind():
  assert {kind for kind, _ in CASES} == set(attention.KINDS)


@pytest.mark.parametrize('kind,positions', CASES)
def test_generation_logits_equal_teacher_forcing(kind, positions):
  model = helpers.build(helpers.tiny(kind, positions=positions))
  graphdef, params = helpers.split(model)
  prompt = helpers.tokens(1, (3, PROMPT_LENGTHS.max()))
  # Sampling (not greedy) so that the generated tokens vary; no early stop.
  settings = decode.DecodeSettings(max_decode_len=STEPS, temperature=1.0, eos_id=None,
                                   return_logits=True)
  out = decode.generate(graphdef, params, prompt, PROMPT_LENGTHS, settings=settings,
                        rng=jax.random.key(7))
  generated = np.asarray(out.tokens)
  assert len(set(generated.ravel().tolist())) > 10
  want = teacher_forced_logits(model, prompt, PROMPT_LENGTHS, generated)
  np.testing.assert_allclose(np.asarray(out.logits), want, atol=2e-5, rtol=2e-5)
  if kind in RING_SLOTS:  # the ring holds exactly the last positions (and the sinks)
    pinned, ring = RING_SLOTS[kind]
    held = np.sort(np.asarray(out.cache[0].window.pos), axis=1)
    for r, length in enumerate(PROMPT_LENGTHS):
      last = length + STEPS - 2  # the last position fed back
      expected = set(range(pinned)) | set(range(last - ring + 1, last + 1))
      assert held[r].tolist() == sorted(expected), (kind, r)


def test_mixed_layers_step_by_step_equal_teacher_forcing():
  """prefill + decode_step called directly, interleaved kinds, learned positions."""
  config = helpers.tiny(positions='learned', num_layers=3,
                        attention=dict(layer_pattern=('global_local', 'hierarchical', 'local')))
  model = helpers.build(config)
  seq = helpers.tokens(2, (2, 30))
  lengths = np.array([11, 6])
  full = np.asarray(helpers.forward(model)(seq))
  logits, caches = jax.jit(lambda p, l: model.prefill(p, l, max_length=30))(seq[:, :11], lengths)
  step = jax.jit(model.decode_step)
  rows = np.arange(2)
  np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=2e-5)
  for i in range(18):
    positions = lengths + i
    logits, caches = step(seq[rows, positions], positions, caches)
    np.testing.assert_allclose(logits, full[rows, positions], atol=2e-5, err_msg=f'step {i}')


@pytest.mark.parametrize('decoder_kind,positions', [
    ('local', 't5_bias'), ('full', 'rope'), ('hierarchical', 'rope'), ('adaptive_span', 't5_bias')])
def test_encoder_decoder_logits_equal_teacher_forcing(decoder_kind, positions):
  config = helpers.tiny('transient_global', arch='encoder_decoder', positions=positions,
                        attention=dict(decoder_kind=decoder_kind, radius=3))
  model = helpers.build(config)
  graphdef, params = helpers.split(model)
  source = helpers.tokens(3, (3, 20))
  segment_ids = np.ones((3, 20), np.int32)
  segment_ids[1, 12:] = 0  # padded source: junk tokens the decoder must not see
  settings = decode.DecodeSettings(max_decode_len=15, temperature=1.0, eos_id=None,
                                   return_logits=True)
  out = decode.generate_seq2seq(graphdef, params, source, segment_ids, settings=settings,
                                rng=jax.random.key(1))
  decoder_inputs = np.concatenate([np.full((3, 1), 2), np.asarray(out.tokens)[:, :-1]], axis=1)
  want = helpers.forward(model)(source, segment_ids, decoder_inputs)
  np.testing.assert_allclose(np.asarray(out.logits), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('kind', sorted(RING_SLOTS))
def test_rolling_cache_does_not_grow_with_the_generation(kind):
  slots = sum(RING_SLOTS[kind])
  config = helpers.tiny(kind, max_len=1_000_000)
  graphdef, params = helpers.split(helpers.build(config))
  prompt = helpers.tokens(4, (2, 13))

  def final_cache_shapes(steps):
    settings = decode.DecodeSettings(max_decode_len=steps)
    shapes = jax.eval_shape(
        lambda p: decode.generate(graphdef, p, prompt, settings=settings).cache, params)
    # The shapes of every buffer (not the positions each cache is made for).
    return [jax.tree.map(lambda x: x.shape, layer.replace(length=0)) for layer in shapes]

  short, long = final_cache_shapes(8), final_cache_shapes(100_000)
  window = short[0].window
  # Rows and kv heads merged (KVBuffer's layout): 2 rows x 2 kv heads.
  assert window.k == window.v == (4, slots, 8) and window.pos == (2, slots)
  assert long[0].window == window
  if kind in ('hierarchical', 'multiresolution'):  # <= 2 * level0_block group means per level
    assert all(p.k[2] <= 8 for p in long[0].pooled)
    assert len(long[0].pooled) == 14 and len(short[0].pooled) == 2  # log2(length / 8)
  elif kind == 'transient_global':  # one summary per block, as many as the kernel uses
    assert short[0].pooled[0].k[2] == -(-(13 + 8 - 1) // 4)
    assert long[0].pooled[0].k[2] == -(-(13 + 100_000 - 1) // 4)
  else:
    assert short == long


def test_full_cache_grows_with_the_generation():
  graphdef, params = helpers.split(helpers.build(helpers.tiny('full', max_len=4096)))
  prompt = helpers.tokens(4, (2, 13))
  for steps in (8, 1000):
    settings = decode.DecodeSettings(max_decode_len=steps)
    cache = jax.eval_shape(
        lambda p: decode.generate(graphdef, p, prompt, settings=settings).cache, params)
    assert cache[0].window.k.shape == (2 * 2, 13 + steps - 1, 8)


def test_cache_bytes_count_every_buffer():
  config = helpers.tiny('transient_global')
  graphdef, params = helpers.split(helpers.build(config))
  settings = decode.DecodeSettings(max_decode_len=12)
  cache = jax.eval_shape(lambda p: decode.generate(graphdef, p, helpers.tokens(6, (2, 9)),
                                                   settings=settings).cache, params)
  # Per layer: window k, v (2, 2, 5, 8) f32 and pos (2, 5) int32; summaries of
  # 20 positions / 4 = 5 blocks: k, v (2, 2, 5, 8), group (2, 5), sums 2 x (2, 2, 8).
  per_layer = 2 * 2 * 5 * 2 * 8 * 4 + 2 * 5 * 4 + 2 * 2 * 5 * 2 * 8 * 4 + 2 * 5 * 4 \
      + 2 * 2 * 2 * 8 * 4
  assert kv_cache.nbytes(cache) == 2 * per_layer


def _loop_copies(hlo: str, slots: int, head_dim: int) -> list:
  """The copy ops, inside the while loops of `hlo` (and what they call), whose
  result is as large as a whole window buffer."""
  computations, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r'(?:ENTRY )?%(\S+) .*\{$', line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name is not None:
      computations[name].append(line)
  called = lambda lines: {c for line in lines
                          for c in re.findall(r'(?:calls|to_apply|body|condition)=%([^,\s)]+)', line)}
  todo = {c for lines in computations.values() for line in lines if ' while(' in line
          for c in re.findall(r'body=%([^,\s)]+)', line)}
  seen = set()
  while todo:
    c = todo.pop()
    if c not in seen and c in computations:
      seen.add(c)
      todo |= called(computations[c])
  found = []
  for c in seen:
    for line in computations[c]:
      match = re.search(r'= [a-z0-9]+\[([0-9,]+)\]\S* copy\(', line)
      if match:
        dims = [int(d) for d in match.group(1).split(',')]
        if slots in dims and np.prod(dims) >= slots * head_dim:
          found.append(line.strip()[:120])
  return found


@pytest.mark.parametrize('cache_dtype', ['auto', 'int8'])
def test_the_generation_loop_writes_the_cache_in_place(cache_dtype):
  # One row, the case where XLA's CPU compiler used to copy the whole window
  # buffer every step (a reshape dropping the size-1 batch axis, fused with
  # the step's write): the compiled loop must hold no copy of a buffer.
  config = helpers.tiny('full', max_len=512)
  graphdef, params = helpers.split(helpers.build(config))
  prompt = helpers.tokens(7, (1, 300))
  settings = decode.DecodeSettings(max_decode_len=40, eos_id=None, kv_cache_dtype=cache_dtype)
  compiled = jax.jit(lambda p: decode.generate(graphdef, p, prompt, settings=settings).tokens
                     ).lower(params).compile()
  slots = 300 + 40 - 1
  assert _loop_copies(compiled.as_text(), slots, config.head_dim) == []


def test_dynamic_ntk_decoding_rotates_for_the_decoded_length():
  # Dynamic NTK's frequencies depend on the length run: decoding uses the cache's
  # (prompt + generation), so the prompt's keys and every generated token equal a
  # forward over exactly that many tokens; a forward of another length differs.
  config = helpers.tiny('full', rope_scaling='dynamic', rope_scaling_factor=4.0,
                        rope_original_max_len=8)
  model = helpers.build(config)
  graphdef, params = helpers.split(model)
  prompt = helpers.tokens(3, (2, 12))
  lengths = np.array([12, 12])
  settings = decode.DecodeSettings(max_decode_len=10, temperature=1.0, eos_id=None,
                                   return_logits=True)
  out = decode.generate(graphdef, params, prompt, lengths, settings=settings,
                        rng=jax.random.key(3))
  generated = np.asarray(out.tokens)
  seq = np.concatenate([prompt, generated], axis=1)
  run = lambda ids: np.asarray(helpers.forward(model)(ids))
  decoded_length = 12 + 10 - 1
  want = run(seq[:, :decoded_length])[:, 11:11 + 10]
  np.testing.assert_allclose(np.asarray(out.logits), want, atol=2e-5, rtol=2e-5)
  longer = run(seq)[:, 11:11 + 10]
  assert np.abs(longer - want).max() > 1e-3
