"""--mode=context_eval: fixed targets at every context, windows inside their
document, bootstrap intervals over documents, and the CLI's files."""
import csv
import math
import os

import ml_collections
import numpy as np
import pytest

from longjax.train import context_eval
from tests.train import train_testing


def _settings(**overrides):
  fields = dict(contexts=(2, 8, 32), num_targets=400, span=4, min_documents=5,
                num_documents=8, batch_size=4, bootstrap=500, seed=3)
  fields.update(overrides)
  return context_eval.ContextEvalSettings(**fields)


def _documents(count=30, seed=0):
  rng = np.random.default_rng(seed)
  # Each document's tokens carry its index, so a window's origin is visible.
  return [np.full(int(n), i, np.int32) * 1000 + np.arange(int(n), dtype=np.int32)
          for i, n in enumerate(rng.integers(10, 200, count))]


def test_the_same_targets_at_every_context_inside_one_document():
  documents, settings = _documents(), _settings()
  targets = context_eval.Targets(documents, settings)
  longest = max(settings.contexts)
  eligible = {i for i, d in enumerate(documents) if len(d) >= longest + settings.span}
  assert set(targets.document) == eligible  # every long-enough document, at least once
  assert len(targets.document) == settings.num_targets // settings.span
  scored = None
  for c in settings.contexts:
    inputs, labels = targets.windows(documents, c)
    assert inputs.shape == labels.shape == (len(targets.document), c + settings.span - 1)
    # Each window is one document's consecutive tokens, labels shifted by one.
    origin = inputs // 1000
    assert (origin == targets.document[:, None]).all() and (labels // 1000 == origin).all()
    assert (np.diff(inputs, axis=1) == 1).all() and (labels - inputs == 1).all()
    this = labels[:, c - 1:]  # the scored block: the same tokens at every c
    assert (this[:, 0] % 1000 == targets.start).all()
    assert (inputs[:, 0] % 1000 == targets.start - c).all()  # exactly c tokens before it
    if scored is not None:
      np.testing.assert_array_equal(this, scored)
    scored = this
  assert (targets.start >= longest).all()


def test_too_few_long_documents_name_the_field():
  with pytest.raises(ValueError, match='context_eval.min_documents'):
    context_eval.Targets(_documents(count=8), _settings(min_documents=50))


def test_bootstrap_interval_over_documents():
  # Documents all with the same mean: no spread.
  low, high = context_eval.bootstrap_interval(np.full(20, 6.0), np.full(20, 3.0), 200, 0)
  assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
  # Two sorts of documents: the interval holds the pooled mean and shrinks as
  # 1 / sqrt(documents) (4x the documents: about half the width).
  rng = np.random.default_rng(0)

  def width(n):
    counts = rng.integers(5, 50, n).astype(float)
    sums = counts * np.where(rng.random(n) < 0.5, 1.0, 3.0)
    low, high = context_eval.bootstrap_interval(sums, counts, 2000, 1)
    assert low < sums.sum() / counts.sum() < high
    return high - low

  assert 0.35 < width(800) / width(200) < 0.65


def test_settings_are_validated():
  config = ml_collections.ConfigDict(dict(seed=0, context_eval=dict(
      contexts='64,16', num_targets=10, span=0, min_documents=1, num_documents=1,
      batch_size=1, bootstrap=1)))
  with pytest.raises(ValueError) as error:
    context_eval.ContextEvalSettings.from_config(config, 128)
  assert 'context_eval.contexts' in str(error.value) and 'context_eval.span' in str(error.value)
  config.context_eval.contexts, config.context_eval.span = '', 4
  assert context_eval.ContextEvalSettings.from_config(config, 128).contexts == (
      8, 16, 32, 64, 128)


def test_cli_writes_the_curves_of_a_trained_run(tmp_path, data_dir):
  env = train_testing.subprocess_env(1)
  workdir = str(tmp_path / 'run')
  config = ['--config=configs/pretrain.py:local,tiny', f'--workdir={workdir}',
            f'--config.dataset.data_dir={data_dir}']
  train_testing.run_python(['-m', 'longjax.main', *config, '--config.num_train_steps=2'], env=env)
  result = train_testing.run_python(
      ['-m', 'longjax.main', *config,
       '--mode=context_eval',
       '--config.context_eval.contexts=4,16,64', '--config.context_eval.num_targets=256',
       '--config.context_eval.min_documents=10', '--config.model.max_len=128'], env=env)
  assert 'context_eval done' in result.stdout
  out = os.path.join(workdir, 'context_eval')
  with open(os.path.join(out, 'context_curve.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['context']) for r in rows] == [4, 16, 64]
  seq_len = train_testing.load_config_module('pretrain').get_config('local,tiny').seq_len
  assert [int(r['extrapolated']) for r in rows] == [int(c > seq_len) for c in (4, 16, 64)]
  assert len({r['num_targets'] for r in rows}) == 1 and int(rows[0]['num_documents']) >= 10
  for r in rows:
    assert float(r['ci_low']) <= float(r['loss']) <= float(r['ci_high'])
    # Bytes: one per target token, so bits per byte is the loss in bits.
    assert float(r['bits_per_byte']) == pytest.approx(float(r['loss']) / math.log(2), rel=1e-6)
  with open(os.path.join(out, 'position_curve.csv'), newline='') as f:
    positions = list(csv.DictReader(f))
  assert int(positions[0]['position_low']) == 1 and len(positions) >= 3
  assert os.path.getsize(os.path.join(out, 'context_curve.png')) > 1000


def test_an_eval_at_a_fixed_needle_depth_is_tagged_with_it(tmp_path):
  env = train_testing.subprocess_env(1)
  workdir = str(tmp_path / 'passkey')
  train_testing.run_main(workdir, env=env, num_train_steps=1, eval_every_steps=0)
  train_testing.run_python(['-m', 'longjax.main', '--config=configs/tiny.py',
                            f'--workdir={workdir}', '--mode=eval',
                            '--config.synthetic.passkey_depth=0.5'], env=env)
  evals = train_testing.read_metrics(workdir, 'eval')
  assert evals[-1]['needle_depth'] == 0.5 and 'accuracy' in evals[-1]
  assert all('needle_depth' not in record for record in evals[:-1])
