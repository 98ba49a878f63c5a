"""Decoding evaluation: scores, prompts of LM rows, predictions files."""
import json
import os
import re

import numpy as np
import pytest
import sacrebleu
import tensorflow_datasets as tfds
from rouge_score import rouge_scorer

from longjax.configs import base as base_config
from longjax import data
from longjax import decode
from longjax.data import tokenizers
from longjax.decode import evaluate
from tests.decode import helpers
from tests.testing import override

PAIRS = [
    ('the cat sat on a mat', 'the cat sat on the mat'),
    ('cats are running in the gardens', 'a cat runs in the garden'),
    ('Return True if a is true.', 'Return True if a is true, False otherwise.'),
    ('', 'nothing was predicted'),
    ('identical', 'identical'),
]


def test_scores_equal_rouge_score_and_sacrebleu():
  predictions, references = zip(*PAIRS)
  metrics = decode.score_texts(list(predictions), list(references))
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  for name in ('rouge1', 'rouge2', 'rougeL'):
    direct = np.mean([scorer.score(r, p)[name].fmeasure for p, r in PAIRS])
    np.testing.assert_allclose(metrics[name], 100 * direct, rtol=1e-9)
  bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
  np.testing.assert_allclose(metrics['bleu'], bleu, rtol=1e-9)
  assert metrics['exact_match'] == 1 / 5 and metrics['num_examples'] == 5


def test_scores_by_hand():
  # 5 of 6 unigrams shared ('the' once): P = R = 5/6; bigrams: the cat, cat sat, sat on: 3/5.
  metrics = decode.score_texts(['the cat sat on a mat'], ['the cat sat on the mat'])
  np.testing.assert_allclose(metrics['rouge1'], 100 * 5 / 6)
  np.testing.assert_allclose(metrics['rouge2'], 100 * 3 / 5)
  # Stemming: 'cats running' and 'cat runs' share both stems.
  assert decode.score_texts(['cats running'], ['cat runs'])['rouge1'] == 100.0
  perfect = decode.score_texts(['a b c d e'], ['a b c d e'])
  assert perfect['bleu'] == pytest.approx(100.0) and perfect['exact_match'] == 1.0
  assert decode.score_texts(['x y z w'], ['a b c d'])['bleu'] == 0.0
  assert decode.score_texts([], []) == {'num_examples': 0}


def test_lm_prompts_split_at_the_answer_or_continue_the_document():
  # Synthetic row: weights mark the answer "789" after "?".
  sequence = np.array([2, 10, 11, 12, 63, 20, 21, 22, 13, 63 - 1, 30, 31, 32])
  inputs, targets = sequence[:-1], sequence[1:]
  weights = np.zeros(12)
  weights[9:] = 1
  split = evaluate.lm_prompt(inputs, targets, weights, np.ones(12, int), max_decode_len=8)
  np.testing.assert_array_equal(split.ids, sequence[:10])
  np.testing.assert_array_equal(split.answer, [30, 31, 32])
  # Plain text, two packed documents: the first one's last half is the answer.
  segment_ids = np.array([1] * 9 + [2] * 3)
  split = evaluate.lm_prompt(inputs, targets, (segment_ids > 0).astype(float), segment_ids,
                             max_decode_len=3)
  np.testing.assert_array_equal(split.ids, sequence[:7])   # 9 tokens: 6 + 3 to predict
  np.testing.assert_array_equal(split.answer, sequence[7:10])
  assert evaluate.lm_prompt(inputs, targets, np.zeros(12), np.zeros(12, int), 8) is None


def small_config(**overrides):
  """longjax/configs/base.py, small, with overrides ('__' nests)."""
  config = base_config.get_config()
  config.batch_size = 4
  config.dataset.prefetch = 0
  config.decode.max_decode_len = 8
  return override(config, **overrides)


def typed(config):
  """(DataConfig, DecodeSettings) of a config: what decode_and_score and sample_texts take."""
  return data.DataConfig.from_config(config), decode.DecodeSettings.from_config(config.decode)


def byte_model(arch):
  config = helpers.tiny('local', arch=arch, vocab_size=259, max_len=64)
  return helpers.build(config)


def read_predictions(workdir, step):
  with open(os.path.join(workdir, 'decode', f'predictions_step{step}.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_decode_and_score_on_passkey_writes_predictions(tmp_path):
  config = small_config(dataset__name='passkey', seq_len=24, synthetic__num_eval_examples=6,
                        synthetic__passkey_digits=4)
  tokenizer = tokenizers.ByteTokenizer()
  metrics = decode.decode_and_score(*typed(config), str(tmp_path), byte_model('lm'), tokenizer,
                                    step=7)
  rows = read_predictions(str(tmp_path), 7)
  assert len(rows) == 6 and metrics['num_examples'] == 6
  for row in rows:
    # The reference is the key hidden between the bars, asked for after '?'.
    assert row['source'].endswith('?')
    assert row['reference'] == re.search(r'\|(\d{4})\|', row['source']).group(1)
    assert len(row['prediction']) <= 4  # 4 tokens: a byte gives at most a character
  expected = decode.score_texts([r['prediction'] for r in rows], [r['reference'] for r in rows])
  for name, value in expected.items():
    assert metrics[name] == value, name
  assert metrics['decode_seconds'] > 0


def test_decode_and_score_on_seq2seq_writes_every_real_example_in_order(tmp_path):
  config = small_config(dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                        dataset__target_key='en', seq_len=24,
                        target_len=16, decode__beam_size=2,
                        dataset__data_dir=str(tmp_path / 'tfds'),
                        dataset__allow_download=True)  # tfds' mocked download makes the data.
  tokenizer = tokenizers.ByteTokenizer()
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source(config.dataset.name, split='validation')
    examples = [source[i] for i in range(len(source))]
    metrics = decode.decode_and_score(*typed(config), str(tmp_path),
                                      byte_model('encoder_decoder'), tokenizer)
    samples = decode.sample_texts(*typed(config), byte_model('encoder_decoder'), tokenizer,
                                  num_examples=2)
  rows = read_predictions(str(tmp_path), 0)
  # 5 examples in two batches of 4: the 3 padding rows are not decoded.
  assert [r['source'] for r in rows] == [tokenizers.as_str(e['de']) for e in examples]
  assert [r['reference'] for r in rows] == [tokenizers.as_str(e['en']) for e in examples]
  assert metrics['num_examples'] == 5
  assert all(len(r['prediction']) <= 8 for r in rows)  # a byte gives at most a character
  assert [s['source'] for s in samples] == [r['source'] for r in rows[:2]]
  text = decode.format_samples(samples)
  assert text.count('prediction:') == 2 and repr(samples[1]['reference']) in text


def test_sample_texts_on_lm_rows_takes_graphdef_and_params():
  config = small_config(dataset__name='passkey', seq_len=24, synthetic__num_eval_examples=8)
  model = helpers.split(byte_model('lm'))  # the trainer passes (graphdef, params)
  samples = decode.sample_texts(*typed(config), model, tokenizers.ByteTokenizer(),
                                num_examples=3)
  assert len(samples) == 3 and all(len(s['reference']) == 5 for s in samples)
