"""In-process training runs on one CPU device with configs/tiny.py."""
import glob
import json
import math
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.train import train_testing
from longjax.train import evaluation
from longjax.train import trainer

TRAIN_KEYS = {'step', 'split', 'loss', 'accuracy', 'perplexity', 'learning_rate',
              'tokens_per_sec', 'steps_per_sec', 'grad_norm'}


def test_one_step_writes_metrics_config_events_and_a_checkpoint(tmp_path):
  config = train_testing.tiny_config(num_train_steps=1)
  state = trainer.train_and_evaluate(config, tmp_path)

  assert int(state.step) == 1
  train, = train_testing.read_metrics(tmp_path, 'train')
  assert TRAIN_KEYS <= set(train) and train['step'] == 1
  assert math.isclose(train['perplexity'], math.exp(train['loss']), rel_tol=1e-6)
  assert 0 < train['learning_rate'] <= config.learning_rate
  eval_record, = train_testing.read_metrics(tmp_path, 'eval')
  assert eval_record['step'] == 1 and 'exact_match' in eval_record  # Synthetic task.
  assert json.loads((tmp_path / 'config.json').read_text())['model']['vocab_size'] == 259
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  # Parameters are fp32 master weights whatever the compute dtype.
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype('float32')}


def test_loss_decreases_on_passkey(tmp_path):
  config = train_testing.tiny_config(num_train_steps=40, log_every_steps=10, eval_every_steps=10,
                                     checkpoint_every_steps=0, learning_rate=1e-2,
                                     profile_steps=2)
  trainer.train_and_evaluate(config, tmp_path)
  assert glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  train = train_testing.read_metrics(tmp_path, 'train')
  assert [r['step'] for r in train] == [10, 20, 30, 40]
  # Chance is ln(259) = 5.6 nats; answering with any digit gets ln(10) = 2.3.
  assert train[-1]['loss'] < train[0]['loss'] - 1.0, train
  evals = [r['loss'] for r in train_testing.read_metrics(tmp_path, 'eval')]
  assert evals[-1] < evals[0] - 0.5, evals


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
  # Updates of ~1e30 leave finite but huge weights after step 1; step 2's
  # forward pass overflows to NaN.
  config = train_testing.tiny_config(learning_rate=1e30, lr_schedule='constant', warmup_steps=0,
                                     checkpoint_every_steps=1, log_every_steps=5)
  with pytest.raises(FloatingPointError, match='step 2') as error:
    trainer.train_and_evaluate(config, tmp_path)
  assert 'last good checkpoint is step 1' in str(error.value)
  # Clipping is on (grad_clip = 1.0): the advice does not suggest it.
  assert 'already clips' in str(error.value) and 'set config.grad_clip' not in str(error.value)
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  step, state = train_testing.restore_state(config, tmp_path)
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_eval_mode_at_a_longer_length_with_adaptive_span(tmp_path):
  config = train_testing.tiny_config(num_train_steps=2, eval_every_steps=0,
                                     model__attention__kind='adaptive_span',
                                     model__attention__max_span=16,
                                     model__attention__span_init=0.5)
  trainer.train_and_evaluate(config, tmp_path)
  train = train_testing.read_metrics(tmp_path, 'train')[-1]
  layers = [f'span/layer_{i}' for i in range(config.model.num_layers)]
  assert 'mean_span' in train and all(key in train for key in layers), sorted(train)
  # Each layer's mean span in tokens; their mean is mean_span. Per-head spans
  # are in the eval records only.
  assert all(0.0 <= train[key] <= 16.0 for key in layers)
  assert np.mean([train[key] for key in layers]) == pytest.approx(train['mean_span'], rel=1e-5)
  assert not any('/head_' in key for key in train)

  config.eval_seq_len = 96  # Three times the training length.
  summary = evaluation.evaluate(config, tmp_path)
  record, = train_testing.read_metrics(tmp_path, 'eval')
  assert record['step'] == 2 and record['seq_len'] == 96
  assert record['loss'] == pytest.approx(summary['loss']) and math.isfinite(record['loss'])
  # The initial span is span_init * max_span; two small steps barely move it.
  assert record['mean_span'] == pytest.approx(8.0, abs=0.5)
  heads = [f'{layer}/head_{h}' for layer in layers for h in range(config.model.num_heads)]
  assert all(key in record for key in layers + heads), sorted(record)
  assert all(0.0 <= record[key] <= 16.0 for key in heads)
  for layer in layers:
    mean = np.mean([record[f'{layer}/head_{h}'] for h in range(config.model.num_heads)])
    assert record[layer] == pytest.approx(mean, rel=1e-5)


def test_eval_mode_without_a_checkpoint_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint to evaluate'):
    evaluation.evaluate(train_testing.tiny_config(), tmp_path)


def test_text_data_logs_bits_per_byte(tmp_path, data_dir):
  config = train_testing.tiny_config(
      num_train_steps=2, log_every_steps=1, eval_every_steps=2, num_eval_steps=1,
      dataset__data_dir=data_dir, dataset__name='longjax_pystdlib', seq_len=64)
  trainer.train_and_evaluate(config, tmp_path)
  for record in train_testing.read_metrics(tmp_path):
    assert 0 < record['bits_per_byte'] < 20 and 'exact_match' not in record


def test_encoder_decoder_on_translation(tmp_path):
  config = train_testing.tiny_config(
      num_train_steps=2, log_every_steps=1, eval_every_steps=2, num_eval_steps=1,
      dataset__name='wmt14_translate/de-en', dataset__input_key='de', dataset__target_key='en',
      model__arch='encoder_decoder', target_len=16, dataset__allow_download=True)
  # tfds' mock data: random text in the dataset's real feature spec, nothing downloaded
  # (allow_download: the mocked download makes it).
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    trainer.train_and_evaluate(config, tmp_path)
  records = train_testing.read_metrics(tmp_path)
  assert [(r['step'], r['split']) for r in records] == [(1, 'train'), (2, 'train'), (2, 'eval')]
  assert all(math.isfinite(r['loss']) and r['bits_per_byte'] > 0 for r in records)
  # The eval at step 2 also decoded a few examples and logged them as text.
  event_files = glob.glob(os.path.join(tmp_path, 'events.out.tfevents.*'))
  assert any(b'decode/samples' in open(path, 'rb').read() for path in event_files)

  # --mode=decode: generate for the eval split from the checkpoint and score it.
  config.decode.max_decode_len = 8
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    scores = evaluation.decode_eval(config, tmp_path)
  # num_eval_steps (1) batches of batch_size rows.
  assert scores['num_examples'] == config.batch_size and 0 <= scores['bleu'] <= 100
  last = train_testing.read_metrics(tmp_path)[-1]
  assert last['split'] == 'decode' and last['step'] == 2 and 'rougeL' in last
  with open(os.path.join(tmp_path, 'decode', 'predictions_step2.jsonl')) as f:
    predictions = [json.loads(line) for line in f]
  assert len(predictions) == config.batch_size and all('reference' in p and 'prediction' in p
                                        for p in predictions)
