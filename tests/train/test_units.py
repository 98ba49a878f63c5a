"""The pure pieces: losses, the learning-rate schedules, the weight-decay mask, metric summaries."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train import train_testing
from longjax import models
from longjax.train import metrics
from longjax.train import optimizer
from longjax.train import state as state_lib
from longjax.train import steps


def _settings(**kwargs):
  return steps.StepSettings(seq2seq=False, seed=0, dropout=False, **kwargs)


def test_token_losses_match_their_formulas():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 3
  targets = jnp.array([[0, 6, 2], [3, 3, 1]])
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  nll_expected = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
  log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))

  nll, objective = steps.token_losses(logits, targets, _settings())
  np.testing.assert_allclose(nll, nll_expected, rtol=1e-5)
  np.testing.assert_allclose(objective, nll_expected, rtol=1e-5)

  _, objective = steps.token_losses(logits, targets, _settings(label_smoothing=0.1, z_loss=1e-3))
  uniform_ce = -log_probs.mean(-1)  # Cross-entropy against the uniform distribution.
  expected = 0.9 * nll_expected + 0.1 * uniform_ce + 1e-3 * log_z**2
  np.testing.assert_allclose(objective, expected, rtol=1e-5)


def test_batch_sums_count_bytes_and_exact_matches():
  logits = jnp.zeros((2, 3, 5)).at[:, :, 4].set(1.0)  # Always predicts token 4.
  batch = {'targets': jnp.array([[4, 4, 1], [4, 0, 0]]),
           'weights': jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])}
  lengths = (0, 0, 0, 1, 2)
  correct = jnp.argmax(logits, axis=-1) == batch['targets']
  sums = steps.batch_sums(correct, jnp.ones((2, 3)), batch,
                          _settings(token_byte_lengths=lengths, exact_match=True))
  assert float(sums['weight_sum']) == 4 and float(sums['nll_sum']) == 4
  assert float(sums['correct_sum']) == 3
  assert float(sums['byte_sum']) == 2 + 2 + 2 + 0  # Token 4 is 2 bytes, pad 0.
  assert float(sums['exact_sum']) == 1 and float(sums['row_sum']) == 2


@pytest.mark.parametrize('kind', ['cosine', 'rsqrt', 'constant'])
def test_learning_rate_schedules(kind):
  config = train_testing.tiny_config(learning_rate=1.0, warmup_steps=10, num_train_steps=110,
                                     lr_schedule=kind, min_lr_ratio=0.1)
  schedule = optimizer.learning_rate_schedule(optimizer.OptimizerConfig.from_config(config))
  lr = lambda update: float(schedule(update - 1))  # optax passes updates already applied.
  assert lr(1) == pytest.approx(0.1) and lr(5) == pytest.approx(0.5)  # Warm-up is never 0.
  assert lr(10) == pytest.approx(1.0)
  if kind == 'cosine':
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
  elif kind == 'rsqrt':
    assert lr(40) == pytest.approx(math.sqrt(10 / 40))
  else:
    assert lr(110) == pytest.approx(1.0)


def test_weight_decay_spares_norms_spans_and_position_biases():
  config = train_testing.tiny_config(model__attention__kind='adaptive_span',
                                     model__positions='t5_bias', model__tie_embeddings=False)
  _, abstract_params = state_lib.abstract_model(models.ModelConfig.from_config(config.model))
  flat = jax.tree_util.tree_flatten_with_path(optimizer.weight_decay_mask(abstract_params))[0]
  decayed = {jax.tree_util.keystr(path): value for path, value in flat}
  block = "['decoder']['blocks'][0]"
  assert decayed[f"{block}['attention']['wq']"] and decayed[f"{block}['mlp']['wo']"]
  assert decayed["['embedder']['token']['table']"] and decayed["['embedder']['head']"]
  assert not decayed[f"{block}['attention_norm']['scale']"]
  assert not decayed[f"{block}['attention']['span_fraction']"]
  assert not decayed["['decoder']['relative_bias']['table']"]


def test_summaries():
  sums = {'nll_sum': 20.0, 'weight_sum': 10.0, 'correct_sum': 4.0, 'byte_sum': 20.0,
          'exact_sum': 1.0, 'row_sum': 4.0, 'mean_span': 12.0}
  summary = metrics.summarize(sums, with_bits_per_byte=True)
  assert summary['loss'] == 2.0 and summary['perplexity'] == pytest.approx(math.exp(2.0))
  assert summary['accuracy'] == 0.4 and summary['exact_match'] == 0.25
  assert summary['bits_per_byte'] == pytest.approx(20.0 / (math.log(2) * 20.0))
  assert summary['mean_span'] == 12.0
  steps_metrics = [dict(sums, learning_rate=0.1, grad_norm=1.0, finite=True),
                   dict(sums, learning_rate=0.2, grad_norm=3.0, finite=True)]
  train = metrics.train_summary(steps_metrics, with_bits_per_byte=False)
  assert train['loss'] == 2.0 and train['learning_rate'] == 0.2 and train['grad_norm'] == 2.0
  assert 'bits_per_byte' not in train
  # mean_span is a property of the weights: the latest value is kept, never summed.
  assert metrics.add_sums({'nll_sum': 1.0, 'mean_span': 3.0},
                          {'nll_sum': 2.0, 'mean_span': 5.0}) == {'nll_sum': 3.0, 'mean_span': 5.0}
  assert train['mean_span'] == 12.0


def test_span_metrics_per_layer_and_head_are_kept_and_logged(tmp_path):
  spans = metrics.span_metrics({0: np.array([2.0, 4.0]), 10: np.array([1.0, 0.0])})
  assert {k: float(v) for k, v in spans.items()} == {
      'span/layer_0': 3.0, 'span/layer_0/head_0': 2.0, 'span/layer_0/head_1': 4.0,
      'span/layer_10': 0.5, 'span/layer_10/head_0': 1.0, 'span/layer_10/head_1': 0.0}
  base = {'nll_sum': 2.0, 'weight_sum': 1.0, 'correct_sum': 0.0, 'byte_sum': 0.0}
  first = dict(base, **{k: np.float32(v) + 1 for k, v in spans.items()})
  second = dict(base, **spans)
  # Properties of the weights: the latest value, never summed.
  assert metrics.add_sums(first, second)['span/layer_0'] == 3.0
  evaluation = metrics.summarize(metrics.add_sums(first, second), with_bits_per_byte=False)
  assert [k for k in evaluation if k.startswith('span/')] == [
      'span/layer_0', 'span/layer_0/head_0', 'span/layer_0/head_1',
      'span/layer_10', 'span/layer_10/head_0', 'span/layer_10/head_1']
  train = metrics.train_summary([dict(first, learning_rate=0.1, grad_norm=1.0),
                                 dict(second, learning_rate=0.1, grad_norm=1.0)],
                                with_bits_per_byte=False)
  assert {k: v for k, v in train.items() if k.startswith('span/')} == {
      'span/layer_0': 3.0, 'span/layer_10': 0.5}  # per head: eval records only
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  writer.write(5, 'train', train)
  writer.write(5, 'eval', evaluation)
  writer.close()
  train_record, eval_record = train_testing.read_metrics(tmp_path)
  assert train_record['split'] == 'train' and train_record['span/layer_10'] == 0.5
  assert eval_record['split'] == 'eval' and eval_record['span/layer_0/head_1'] == 4.0


def test_jsonl_writer_truncates_after_a_resumed_step(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': float(step)})
  writer.write(3, 'eval', {'loss': float('nan')})
  writer.truncate_after(2)
  writer.write(3, 'train', {'loss': 30.0})
  writer.close()
  assert [(r['step'], r['loss']) for r in train_testing.read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]


def _jsonl_lines(path):
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
  """A kill in the middle of a write leaves half a record; resuming must not fail on it."""
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n'
                  '{"step": 2, "split": "train", "loss": 2.0}\n{"step": 3, "spl')
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  writer.truncate_after(2)
  writer.write(3, 'train', {'loss': 3.0})
  writer.close()
  assert [json.loads(line)['step'] for line in _jsonl_lines(path)] == [1, 2, 3]


def test_a_damaged_metrics_line_inside_the_file_is_named(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n')
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  with pytest.raises(ValueError, match='line 2 is not a JSON record'):
    writer.truncate_after(1)
  writer.write(3, 'train', {'loss': 3.0})  # The writer still works (its file was reopened).
  writer.close()
  assert len(_jsonl_lines(path)) == 4


def test_the_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
  """A failure (a kill) during the rewrite at resume leaves the whole old history."""
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  for step in range(1, 6):
    writer.write(step, 'train', {'loss': float(step)})
  before = _jsonl_lines(tmp_path / 'metrics.jsonl')

  def killed(*args):
    raise KeyboardInterrupt('killed during the rewrite')

  monkeypatch.setattr(metrics.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    writer.truncate_after(2)
  monkeypatch.undo()
  writer.close()
  assert _jsonl_lines(tmp_path / 'metrics.jsonl') == before


def test_a_run_from_step_0_moves_an_old_history_aside(tmp_path):
  old = tmp_path / 'metrics.jsonl'
  old.write_text('{"step": 7, "split": "train", "loss": 7.0}\n')
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  writer.start_fresh()
  writer.write(1, 'train', {'loss': 1.0})
  writer.close()
  assert [json.loads(line)['step'] for line in _jsonl_lines(old)] == [1]
  moved = tmp_path / 'metrics.jsonl.previous-1'
  assert [json.loads(line)['step'] for line in _jsonl_lines(moved)] == [7]
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)  # Again: a second file aside.
  writer.start_fresh()
  writer.close()
  assert (tmp_path / 'metrics.jsonl.previous-2').exists() and not _jsonl_lines(old)


class _Checkpoints:
  directory = '/w/checkpoints'

  def __init__(self, latest):
    self.latest = latest

  def wait(self):
    pass

  def latest_step(self):
    return self.latest


@pytest.mark.parametrize('latest, grad_clip, says, never', [
    (None, 0.0, ['No checkpoint was saved before it', 'set config.grad_clip'],
     ['step None', 'already clips']),
    (4, 1.0, ['last good checkpoint is step 4', 'grad_clip = 1 already clips'],
     ['set config.grad_clip']),
])
def test_the_nan_message_says_what_is_true(latest, grad_clip, says, never):
  from longjax.train import trainer  # pylint: disable=g-import-not-at-top
  with pytest.raises(FloatingPointError, match='step 5') as error:
    trainer._check_finite((5, False), checkpoints=_Checkpoints(latest),  # pylint: disable=protected-access
                          grad_clip=grad_clip)
  for text in says:
    assert text in str(error.value)
  for text in never:
    assert text not in str(error.value)
