"""Tokenizers: byte ids, round trips, specials, bits-per-byte counts, SentencePiece training."""
import dataclasses
import os
import threading

import numpy as np
import pytest

from longjax import data
from longjax.data import sources
from longjax.data import tokenizers

TEXTS = ['', 'hello', 'héllo wörld ✓ 𝄞', 'def f(x):\n    return x  # tab\there\n', '\x00\x7f']


def test_byte_ids_are_utf8_bytes_plus_three():
  tokenizer = tokenizers.ByteTokenizer()
  assert tokenizer.vocab_size == 259
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  assert tokenizer.encode('Aé') == [65 + 3, 0xC3 + 3, 0xA9 + 3]
  assert tokenizer.encode(b'A\xc3\xa9') == tokenizer.encode('Aé')
  assert tokenizer.encode_to_array('Aé').dtype == np.int32


@pytest.mark.parametrize('text', TEXTS)
def test_byte_round_trip(text):
  tokenizer = tokenizers.ByteTokenizer()
  ids = tokenizer.encode(text)
  assert min(ids, default=3) >= 3  # encode never emits specials.
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(tokenizer.encode(text.encode('utf-8'))) == text


def test_decode_drops_bos_and_stops_at_eos_or_pad():
  tokenizer = tokenizers.ByteTokenizer()
  ids = tokenizer.encode('abc')
  assert tokenizer.decode([2] + ids + [1] + tokenizer.encode('zzz')) == 'abc'
  assert tokenizer.decode(np.array(ids + [0, 0, 0])) == 'abc'


def test_byte_tokenizer_counts_one_byte_per_real_token():
  tokenizer = tokenizers.ByteTokenizer()
  ids = [2] + tokenizer.encode('héllo') + [1, 0, 0]
  assert tokenizer.bytes_per_token(ids) == 1.0
  assert tokenizer.token_byte_lengths[np.array(ids)].sum() == len('héllo'.encode('utf-8'))


def test_unknown_tokenizer_kind_is_rejected(make_data_config):
  with pytest.raises(ValueError, match="config.tokenizer.kind = 'wordpiece': must be 'bytes'"):
    make_data_config(tokenizer__kind='wordpiece')


def with_spm_model_path(config, path):
  return dataclasses.replace(config, tokenizer=dataclasses.replace(config.tokenizer,
                                                                   spm_model_path=path))


@pytest.fixture(scope='module')
def spm_workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('spm_workdir'))


@pytest.fixture(scope='module')
def trained_spm(spm_workdir, make_data_config):
  """A 2k-piece model trained by get_tokenizer on longjax_pystdlib's training split."""
  config = make_data_config(tokenizer__kind='sentencepiece', tokenizer__spm_vocab_size=2000)
  return data.get_tokenizer(config, spm_workdir, process_index=0), config


def test_sentencepiece_trains_on_the_embedded_corpus(trained_spm, spm_workdir):
  tokenizer, _ = trained_spm
  assert os.path.exists(os.path.join(spm_workdir, 'spm.model'))
  assert tokenizer.vocab_size == 2000
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)


def test_sentencepiece_round_trips_and_compresses_held_out_code(trained_spm):
  tokenizer, config = trained_spm
  source = sources.get_data_source(config.dataset, 'validation')
  text = tokenizers.as_str(source[0]['text'])
  ids = tokenizer.encode(source[0]['text'])  # bytes, as array_record gives them
  assert tokenizer.decode(ids) == text  # Identity normalisation keeps indentation.
  assert min(ids) >= 3
  assert len(ids) < len(text.encode('utf-8')) / 2
  # Bits per byte needs the exact byte count behind the tokens.
  assert tokenizer.token_byte_lengths[np.array(ids)].sum() == len(text.encode('utf-8'))
  assert tokenizer.bytes_per_token(ids) == pytest.approx(len(text.encode('utf-8')) / len(ids))


def test_sentencepiece_reuses_a_trained_model_and_loads_a_path(trained_spm, spm_workdir):
  tokenizer, config = trained_spm
  model_path = os.path.join(spm_workdir, 'spm.model')
  mtime = os.path.getmtime(model_path)
  again = data.get_tokenizer(config, spm_workdir, process_index=0)
  assert os.path.getmtime(model_path) == mtime
  loaded = data.get_tokenizer(with_spm_model_path(config, model_path), None)
  assert loaded.encode('import os\n') == again.encode('import os\n') == tokenizer.encode('import os\n')


def test_other_processes_wait_for_process_zero(trained_spm, tmp_path):
  _, config = trained_spm
  with pytest.raises(TimeoutError, match='process 0'):
    data.get_tokenizer(config, str(tmp_path), process_index=1, wait_timeout_s=0.2)
  # Once process 0's file appears, a waiting process loads it.
  source_model = trained_spm[0].model_path
  timer = threading.Timer(0.3, lambda: os.link(source_model, tmp_path / 'spm.model'))
  timer.start()
  waited = data.get_tokenizer(config, str(tmp_path), process_index=1, wait_timeout_s=30)
  timer.join()
  assert waited.vocab_size == 2000


def test_sentencepiece_model_needs_reserved_ids(tmp_path):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(['hello world'] * 50 + ['abc def ghi'] * 50),
      model_prefix=str(tmp_path / 'default_ids'), vocab_size=30, model_type='bpe', minloglevel=2)
  with pytest.raises(ValueError, match='pad_id=0'):
    tokenizers.SentencePieceTokenizer(str(tmp_path / 'default_ids.model'))
