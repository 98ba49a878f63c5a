"""Synthetic diagnostics: the weighted targets are exactly the answers, examples are reproducible."""
import re

import numpy as np
import pytest

from tests.data import data_testing
from longjax import data
from longjax.data import synthetic
from longjax.data import tokenizers

TOKENIZER = tokenizers.ByteTokenizer()


def task(make_data_config, name, seq_len=64, split='train', **overrides):
  config = make_data_config(dataset__name=name, **overrides)
  return synthetic.make_task(config, TOKENIZER, split=split, seq_len=seq_len)


def text_of(row):
  """The whole sequence S as text: inputs (after bos) plus the last target."""
  return TOKENIZER.decode(np.append(row['inputs'][1:], row['targets'][-1]))


def answers(row):
  return TOKENIZER.decode(row['targets'][row['weights'] > 0])


def assert_question_is_global(row, seq_len, answers_too=False):
  """The question is the global part: from the last query mark of the inputs to
  the input that predicts the first answer token (to the end with answers_too)."""
  question = np.flatnonzero(row['inputs'] == TOKENIZER.encode('?')[0])[-1]
  first_answer = np.flatnonzero(row['weights'])[0]
  positions = np.arange(seq_len)
  end = seq_len if answers_too else first_answer + 1
  np.testing.assert_array_equal(row['global_mask'], (positions >= question) & (positions < end))


def assert_lm_row(row, seq_len):
  for key in ('inputs', 'targets', 'segment_ids', 'positions', 'global_mask'):
    assert row[key].shape == (seq_len,) and row[key].dtype == np.int32
  assert_question_is_global(row, seq_len)
  assert row['weights'].dtype == np.float32
  assert row['inputs'][0] == TOKENIZER.bos_id
  np.testing.assert_array_equal(row['targets'][:-1], row['inputs'][1:])
  np.testing.assert_array_equal(row['positions'], np.arange(seq_len))
  assert (row['segment_ids'] == 1).all()


@pytest.mark.parametrize('seq_len', [32, 64, 257, 1000])
def test_passkey_answer_is_the_hidden_key(make_data_config, seq_len):
  passkey = task(make_data_config, 'passkey', seq_len=seq_len)
  for index in range(20):
    row = passkey[index]
    assert_lm_row(row, seq_len)
    text = text_of(row)
    hidden = re.fullmatch(r'[a-z ]*\|(\d{5})\|[a-z ]*\?(\d{5})', text)
    assert hidden, text
    assert answers(row) == hidden.group(1) == hidden.group(2)
    assert row['weights'].sum() == 5 and (row['weights'][-5:] == 1).all()


def test_passkey_depth_places_the_key(make_data_config):
  for depth, expected_start in ((0.0, 0), (1.0, 64 - 2 * 5 - 3), (0.5, round(0.5 * 51))):
    row = task(make_data_config, 'passkey', synthetic__passkey_depth=depth)[3]
    assert text_of(row).index('|') == expected_start


def test_passkey_examples_are_reproducible_and_splits_differ(make_data_config):
  train = task(make_data_config, 'passkey')
  again = task(make_data_config, 'passkey')
  evaluation = task(make_data_config, 'passkey', split='eval')
  other_seed = task(make_data_config, 'passkey', seed=7)
  for index in (0, 5, 999_999):
    data_testing.assert_batches_equal([train[index]], [again[index]])
  assert [answers(train[i]) for i in range(10)] != [answers(evaluation[i]) for i in range(10)]
  assert [answers(train[i]) for i in range(10)] != [answers(other_seed[i]) for i in range(10)]
  assert len(train) == 1_000_000 and len(evaluation) == 256
  with pytest.raises(IndexError):
    evaluation[256]  # pylint: disable=pointless-statement


def test_passkey_with_natural_filler_hides_the_key_in_stdlib_text(make_data_config):
  config = make_data_config(dataset__name='passkey', synthetic__filler='text', seq_len=256)
  batch = next(data.build_train_iterator(config, TOKENIZER, process_index=0, process_count=1))
  random_filler = set(synthetic.FILLER_CHARS)
  for row in range(4):
    text = TOKENIZER.decode(np.append(batch['inputs'][row][1:], batch['targets'][row][-1]))
    before, key, after_and_query = text.split('|')
    filler, asked = after_and_query.rsplit('?', 1)
    assert key == asked == TOKENIZER.decode(batch['targets'][row][batch['weights'][row] > 0])
    # Code, not the random letter filler: it has characters the random filler never uses.
    assert set(before + filler) - random_filler


def test_associative_recall_answers_are_the_queried_values(make_data_config):
  recall = task(make_data_config, 'associative_recall', synthetic__num_pairs=8,
                synthetic__num_queries=4)
  for index in range(20):
    row = recall[index]
    assert_lm_row(row, 64)
    text = text_of(row)
    pairs_part, queries = text[:16], text.rsplit('?', 1)[1]
    pairs = dict(zip(pairs_part[0::2], pairs_part[1::2]))
    assert len(pairs) == 8 and all(k.islower() for k in pairs)
    assert len(queries) == 8
    asked = dict(zip(queries[0::2], queries[1::2]))
    assert len(asked) == 4 and all(pairs[key] == value for key, value in asked.items())
    assert answers(row) == queries[1::2]


def test_selective_copy_answers_are_the_scattered_tokens(make_data_config):
  copy = task(make_data_config, 'selective_copy', synthetic__copy_tokens=6)
  for index in range(20):
    row = copy[index]
    assert_lm_row(row, 64)
    region, copied = text_of(row).rsplit('?', 1)
    assert region.replace('.', '') == copied == answers(row)
    assert len(copied) == 6


def test_answer_accuracy_counts_only_weighted_targets(make_data_config):
  config = make_data_config(dataset__name='passkey', batch_size=8)
  batch = next(iter(data.build_eval_iterator(config, TOKENIZER, process_index=0, process_count=1)))
  assert batch['weights'].sum() == 8 * 5
  assert synthetic.answer_accuracy(batch['targets'], batch) == (1.0, 1.0)
  wrong_filler = np.where(batch['weights'] > 0, batch['targets'], 0)
  assert synthetic.answer_accuracy(wrong_filler, batch) == (1.0, 1.0)
  one_digit_off = batch['targets'].copy()
  one_digit_off[0, -1] = 0
  assert synthetic.answer_accuracy(one_digit_off, batch) == (1 - 1 / 40, 7 / 8)


def test_eval_at_another_length_and_padding(make_data_config):
  config = make_data_config(dataset__name='passkey', synthetic__num_eval_examples=10, batch_size=4)
  batches = list(data.build_eval_iterator(config, TOKENIZER, seq_len=256, process_index=0,
                                          process_count=1))
  assert len(batches) == 3 and all(b['inputs'].shape == (4, 256) for b in batches)
  assert [b['weights'].sum() for b in batches] == [20, 20, 10]  # Two padding rows at the end.
  config = make_data_config(dataset__name='passkey', synthetic__num_eval_examples=10,
                            batch_size=4, eval_seq_len=128)
  batch = next(iter(data.build_eval_iterator(config, TOKENIZER, process_index=0, process_count=1)))
  assert batch['inputs'].shape == (4, 128)


def test_too_short_or_unknown_tasks_raise(make_data_config):
  with pytest.raises(ValueError, match='too short'):
    task(make_data_config, 'passkey', seq_len=12)
  with pytest.raises(ValueError, match='too short'):
    task(make_data_config, 'associative_recall', seq_len=20)
  with pytest.raises(ValueError, match='filler'):
    task(make_data_config, 'passkey', synthetic__filler='poetry')


def test_tasks_need_single_token_characters(make_data_config):
  class WordTokenizer(tokenizers.ByteTokenizer):
    def encode_to_array(self, text):
      return np.asarray([7, 8], np.int32)  # Every character takes two tokens.

  config = make_data_config(dataset__name='passkey')
  with pytest.raises(ValueError, match='one token'):
    synthetic.make_task(config, WordTokenizer(), split='train', seq_len=64)[0]  # pylint: disable=expression-not-assigned
