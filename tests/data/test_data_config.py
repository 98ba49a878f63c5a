"""DataConfig: the config read once into typed values; every bad data field named at once."""
import dataclasses

import pytest

from longjax import data


def test_fields_are_the_configs_and_eval_seq_len_is_resolved(make_config):
  config = make_config(seq_len=48, eval_seq_len=-1, seed=3)
  data_config = data.DataConfig.from_config(config)
  assert data_config.dataset.name == config.dataset.name == 'longjax_pystdlib'
  assert data_config.dataset == data.DatasetConfig(**config.dataset.to_dict())
  assert data_config.tokenizer == data.TokenizerConfig(**config.tokenizer.to_dict())
  assert data_config.synthetic_tasks == data.SyntheticConfig(**config.synthetic.to_dict())
  assert (data_config.seq_len, data_config.eval_seq_len, data_config.seed) == (48, 48, 3)
  assert data_config.batch_size == config.batch_size
  config.eval_seq_len = 96
  assert data.DataConfig.from_config(config).eval_seq_len == 96
  # A plain nested dict reads the same.
  assert data.DataConfig.from_config(make_config(seq_len=48, seed=3).to_dict()) == data_config


def test_values_are_frozen(make_data_config):
  data_config = make_data_config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    data_config.seq_len = 1  # pylint: disable=assigning-non-slot
  with pytest.raises(dataclasses.FrozenInstanceError):
    data_config.dataset.name = 'pg19'  # pylint: disable=assigning-non-slot


def test_synthetic_and_seq2seq(make_data_config):
  assert make_data_config(dataset__name='passkey').synthetic
  assert not make_data_config().synthetic
  translation = make_data_config(dataset__name='longjax_bible_en_es', dataset__input_key='en',
                                 dataset__target_key='es')
  assert translation.seq2seq and not translation.synthetic


def problems_of(make_config, **overrides):
  with pytest.raises(ValueError) as error:
    data.DataConfig.from_config(make_config(**overrides))
  assert isinstance(error.value, data.DataConfigError)
  lines = str(error.value).splitlines()
  assert lines[0] == 'Invalid config:'
  assert tuple(line.strip() for line in lines[1:]) == error.value.problems
  return error.value.problems


def test_every_problem_is_named_at_once(make_config):
  problems = problems_of(
      make_config, seq_len=0, eval_seq_len=-2, batch_size=0, dataset__num_workers=-1,
      dataset__prefetch=-1, tokenizer__kind='wordpiece')
  assert problems == (
      'config.seq_len = 0: must be >= 1.',
      'config.batch_size = 0: must be >= 1.',
      'config.eval_seq_len = -2: must be >= 1, or -1 for seq_len.',
      'config.dataset.num_workers = -1: must be >= 0 (grain worker processes; 0 reads in the '
      'main process).',
      'config.dataset.prefetch = -1: must be >= 0 (batches prefetched on a background thread; '
      '0 = none).',
      "config.tokenizer.kind = 'wordpiece': must be 'bytes' or 'sentencepiece'.",
  )


def test_task_settings_are_checked_only_for_that_task(make_config):
  bad_synthetic = dict(synthetic__passkey_digits=0, synthetic__passkey_depth=1.5,
                       synthetic__filler='poetry', synthetic__num_pairs=4,
                       synthetic__num_queries=5, synthetic__copy_tokens=0)
  data.DataConfig.from_config(make_config(**bad_synthetic))  # Pretraining ignores them.
  assert problems_of(make_config, dataset__name='passkey', **bad_synthetic) == (
      'config.synthetic.passkey_digits = 0: must be >= 1.',
      'config.synthetic.passkey_depth = 1.5: must be in [0, 1] or -1.',
      "config.synthetic.filler = 'poetry': must be 'random' or 'text'.",
  )
  assert problems_of(make_config, dataset__name='associative_recall', **bad_synthetic) == (
      'config.synthetic.num_queries = 5: associative_recall needs 1 <= num_queries (5) <= '
      'num_pairs (4) <= 26.',
  )
  assert problems_of(make_config, dataset__name='associative_recall',
                     synthetic__num_pairs=27) == (
      'config.synthetic.num_pairs = 27: associative_recall needs 1 <= num_queries (4) <= '
      'num_pairs (27) <= 26.',
  )
  assert problems_of(make_config, dataset__name='selective_copy', **bad_synthetic) == (
      'config.synthetic.copy_tokens = 0: must be >= 1.',
  )


def test_sentencepiece_vocab_is_checked_only_when_one_is_trained(make_config):
  data.DataConfig.from_config(make_config(tokenizer__spm_vocab_size=0))  # bytes
  data.DataConfig.from_config(make_config(tokenizer__kind='sentencepiece',
                                          tokenizer__spm_vocab_size=0,
                                          tokenizer__spm_model_path='/models/spm.model'))
  assert problems_of(make_config, tokenizer__kind='sentencepiece', tokenizer__spm_vocab_size=0) == (
      'config.tokenizer.spm_vocab_size = 0: must be >= 1 (pieces of the SentencePiece model '
      'trained into the workdir).',
  )


def test_target_len_is_checked_only_for_seq2seq(make_config):
  data.DataConfig.from_config(make_config(target_len=0))
  assert problems_of(make_config, dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                     dataset__target_key='en', target_len=0) == (
      'config.target_len = 0: must be >= 1 (the seq2seq target length).',)


def test_missing_and_mistyped_fields_are_named(make_config):
  raw = make_config().to_dict()
  del raw['synthetic']['filler']
  raw['seq_len'] = 'long'
  raw['dataset']['pack'] = 'yes'
  with pytest.raises(data.DataConfigError) as error:
    data.DataConfig.from_config(raw)
  assert error.value.problems == (
      "config.dataset.pack = 'yes': must be True or False.",
      'config.synthetic.filler is missing: the data layer reads it (longjax/configs/base.py documents '
      'it).',
      "config.seq_len = 'long': must be a number.",
  )


def test_replace_validates_too(make_data_config):
  with pytest.raises(ValueError, match='config.batch_size = 0'):
    dataclasses.replace(make_data_config(), batch_size=0)
