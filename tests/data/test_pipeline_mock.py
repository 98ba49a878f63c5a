"""The real pipeline over tfds mock data (no TensorFlow): shapes, masks, dtypes, sharding."""
import functools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data import data_testing
from longjax import data
from longjax.data import tokenizers

LM_KEYS = {'inputs', 'targets', 'weights', 'segment_ids', 'positions', 'global_mask'}
SEQ2SEQ_KEYS = {'inputs', 'inputs_segment_ids', 'decoder_inputs', 'targets', 'weights',
                'decoder_segment_ids'}


@pytest.fixture
def mock_tfds():
  def mock(num_examples):
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)
  return mock


@pytest.fixture
def make_mock_config(make_data_config):
  """make_data_config with allow_download: under tfds' mock, "downloading" makes the mock data
  (no dataset is prepared in data_dir, and the mocked download_and_prepare fetches nothing)."""
  return functools.partial(make_data_config, dataset__allow_download=True)


def mock_texts(config, split, key):
  source = tfds.data_source(config.dataset.name, split=split)
  return [tokenizers.as_str(source[i][key]) for i in range(len(source))]


def assert_lm_batch(batch, batch_size, seq_len):
  assert set(batch) == LM_KEYS
  for key, value in batch.items():
    assert value.shape == (batch_size, seq_len), key
    assert value.dtype == (np.float32 if key == 'weights' else np.int32), key
  ids = batch['segment_ids']
  np.testing.assert_array_equal(batch['weights'], (ids > 0).astype(np.float32))
  same = (ids[:, :-1] > 0) & (ids[:, :-1] == ids[:, 1:])
  np.testing.assert_array_equal(batch['targets'][:, :-1][same], batch['inputs'][:, 1:][same])


def test_lm_batches_over_pg19_mock(make_mock_config, mock_tfds):
  config = make_mock_config(dataset__name='pg19', dataset__input_key='book_text', seq_len=32,
                            batch_size=4)
  tokenizer = tokenizers.ByteTokenizer()
  with mock_tfds(12):
    books = set(mock_texts(config, 'train', 'book_text'))
    batches = data_testing.take(
        data.build_train_iterator(config, tokenizer, process_index=0, process_count=1), 6)
  for batch in batches:
    assert_lm_batch(batch, 4, 32)
    for row in range(4):
      for segment in np.unique(batch['segment_ids'][row][batch['segment_ids'][row] > 0]):
        where = batch['segment_ids'][row] == segment
        inputs, targets = batch['inputs'][row][where], batch['targets'][row][where]
        # Mock books (10-19 characters) fit in one window: bos, the book, then eos.
        assert inputs[0] == tokenizer.bos_id and targets[-1] == tokenizer.eos_id
        assert tokenizer.decode(inputs[1:]) in books
  # Short books are packed several to a row.
  assert max(batch['segment_ids'].max() for batch in batches) >= 2


def test_seq2seq_batches_over_wmt_mock(make_mock_config, mock_tfds):
  config = make_mock_config(dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                            dataset__target_key='en', seq_len=24, target_len=12, batch_size=4)
  tokenizer = tokenizers.ByteTokenizer()
  with mock_tfds(10):
    batch = next(data.build_train_iterator(config, tokenizer, process_index=0, process_count=1))
  assert set(batch) == SEQ2SEQ_KEYS
  assert batch['inputs'].shape == batch['inputs_segment_ids'].shape == (4, 24)
  for key in ('decoder_inputs', 'targets', 'weights', 'decoder_segment_ids'):
    assert batch[key].shape == (4, 12), key
    assert batch[key].dtype == (np.float32 if key == 'weights' else np.int32)
  np.testing.assert_array_equal(batch['inputs_segment_ids'], (batch['inputs'] > 0).astype(np.int32))
  np.testing.assert_array_equal(batch['decoder_segment_ids'], (batch['weights'] > 0).astype(np.int32))
  assert (batch['decoder_inputs'][:, 0] == tokenizer.bos_id).all()
  real = batch['weights'][:, 1:] > 0
  np.testing.assert_array_equal(batch['decoder_inputs'][:, 1:][real], batch['targets'][:, :-1][real])
  last = batch['weights'].sum(axis=1).astype(int) - 1
  assert (batch['targets'][np.arange(4), last] == tokenizer.eos_id).all()
  # Mock sentences are 10-19 bytes: the 12-token target is cut to 11 + eos.
  assert (last <= 11).all()


def test_eval_pads_the_last_batch_and_returns_text(make_mock_config, mock_tfds):
  config = make_mock_config(dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                            dataset__target_key='en', seq_len=24, target_len=24, batch_size=4)
  tokenizer = tokenizers.ByteTokenizer()
  with mock_tfds(5):
    sources_de = mock_texts(config, 'validation', 'de')
    targets_en = mock_texts(config, 'validation', 'en')
    batches = list(data.build_eval_iterator(config, tokenizer, process_index=0, process_count=1,
                                            with_text=True))
    again = list(data.build_eval_iterator(config, tokenizer, process_index=0, process_count=1,
                                          with_text=True))
  data_testing.assert_batches_equal(batches, again)  # Deterministic.
  assert len(batches) == 2
  texts = batches[0]['inputs_text'] + batches[1]['inputs_text']
  assert texts == sources_de + [''] * 3  # In order, padding rows last.
  assert batches[0]['targets_text'] + batches[1]['targets_text'] == targets_en + [''] * 3
  for batch in batches:
    for row in range(4):
      assert tokenizer.decode(batch['inputs'][row]) == batch['inputs_text'][row]
      assert tokenizer.decode(batch['targets'][row]) == batch['targets_text'][row]
  padding = batches[1]
  assert padding['weights'][1:].sum() == 0 and (padding['inputs'][1:] == 0).all()
  assert padding['weights'][0].sum() > 0


def test_eval_rows_split_across_processes(make_mock_config, mock_tfds):
  config = make_mock_config(dataset__name='pg19', dataset__input_key='book_text', seq_len=16,
                            batch_size=4)
  tokenizer = tokenizers.ByteTokenizer()
  with mock_tfds(9):
    single = list(data.build_eval_iterator(config, tokenizer, process_index=0, process_count=1))
    halves = [list(data.build_eval_iterator(config, tokenizer, process_index=p, process_count=2))
              for p in range(2)]
  assert len(single) == len(halves[0]) == len(halves[1]) >= 2
  for whole, first, second in zip(single, *halves):
    assert_lm_batch(first, 2, 16)
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))


def test_train_shards_by_process(make_mock_config, mock_tfds):
  config = make_mock_config(dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                            dataset__target_key='en', seq_len=24, batch_size=4)
  tokenizer = tokenizers.ByteTokenizer()
  with mock_tfds(8):
    encoded = [tuple(tokenizer.encode(text)) for text in mock_texts(config, 'train', 'de')]
    seen = []
    for process in range(2):
      iterator = data.build_train_iterator(config, tokenizer, process_index=process, process_count=2)
      rows = [tuple(int(t) for t in row if t > 2) for batch in data_testing.take(iterator, 2)
              for row in batch['inputs']]
      assert len(rows) == 4  # Local batch 2, two batches: one epoch of this shard.
      seen.append(set(rows))
  assert not seen[0] & seen[1]  # Each process reads its own slice...
  assert seen[0] | seen[1] == set(encoded)  # ...and together they read everything.


def test_batch_size_must_divide_among_processes(make_data_config):
  config = make_data_config(batch_size=6)
  with pytest.raises(ValueError, match='config.batch_size'):
    data.build_train_iterator(config, tokenizers.ByteTokenizer(), process_index=0, process_count=4)
  with pytest.raises(ValueError, match='config.batch_size'):
    data.build_eval_iterator(config, tokenizers.ByteTokenizer(), process_index=0, process_count=4)


def test_seq2seq_is_a_target_feature_of_a_real_dataset(make_data_config):
  # Whether the model fits the data (encoder_decoder needs seq2seq) is
  # train/validation.py's check: the data layer never sees the model.
  assert not make_data_config().seq2seq
  assert make_data_config(dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                          dataset__target_key='en').seq2seq
  passkey = make_data_config(dataset__name='passkey', dataset__target_key='x')
  assert passkey.synthetic and not passkey.seq2seq  # Synthetic tasks are LM rows.


def test_with_text_is_for_seq2seq(make_data_config):
  with pytest.raises(ValueError, match='with_text'):
    data.build_eval_iterator(make_data_config(), tokenizers.ByteTokenizer(), process_index=0,
                             process_count=1, with_text=True)
