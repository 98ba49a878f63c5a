"""Checkpoint robustness and gradient accumulation, through `python -m longjax.main`.

Subprocess runs on one device share a compilation cache, so the repeated
runs of one program compile it once.
"""
import glob
import os

import jax
import numpy as np
import pytest

from tests.train import train_testing
from longjax.train import trainer

# Every test here trains in `python -m longjax.main` subprocesses.
pytestmark = pytest.mark.slow

RUN = dict(num_train_steps=8, checkpoint_every_steps=4, keep_checkpoints=3, log_every_steps=1,
           eval_every_steps=0)


@pytest.fixture(scope='module')
def env(compile_cache):
  return train_testing.subprocess_env(num_devices=1, cache_dir=compile_cache)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, env):
  train_testing.run_main(tmp_path / 'reference', env=env, **RUN)
  workdir = tmp_path / 'run'
  train_testing.run_main(workdir, env=env, **RUN)
  _, expected = train_testing.restore_state(train_testing.tiny_config(**RUN),
                                            tmp_path / 'reference')

  # Damage step 8's array data; leave an unfinished save of step 12 behind.
  damaged = glob.glob(str(workdir / 'checkpoints' / '8' / 'state' / '**' / 'd' / '*'),
                      recursive=True)
  assert damaged
  for path in damaged:
    with open(path, 'wb') as f:
      f.write(b'not a checkpoint')
  os.makedirs(workdir / 'checkpoints' / '12.orbax-checkpoint-tmp-0' / 'state')

  result = train_testing.run_main(workdir, env=env, **RUN)
  assert 'Checkpoint at step 8' in result.stderr and 'could not be restored' in result.stderr
  assert 'Restored the checkpoint at step 4' in result.stderr

  # Trained 5..8 again from step 4: bitwise the uninterrupted result.
  step, resumed = train_testing.restore_state(train_testing.tiny_config(**RUN), workdir)
  assert step == 8
  train_testing.assert_trees_equal(expected, resumed)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']  # Temporary dir cleaned.
  set_aside, = os.listdir(workdir / 'checkpoints_corrupt')
  assert set_aside.startswith('8.')  # Moved, not deleted.
  records = [(r['step'], r['split'], r['loss']) for r in train_testing.read_metrics(workdir)]
  assert records == [(r['step'], r['split'], r['loss'])
                     for r in train_testing.read_metrics(tmp_path / 'reference')]

  # A readable checkpoint of another model is a config error, not corruption: the
  # resume check refuses it first, and, if the change is allowed, the restore does.
  other = train_testing.tiny_config(**RUN, model__emb_dim=48)
  with pytest.raises(ValueError, match='config.model.emb_dim: saved 32, given 48'):
    trainer.train_and_evaluate(other, workdir)
  with pytest.raises(ValueError, match='does not match the model'):
    trainer.train_and_evaluate(other, workdir, allow_config_change=['model.emb_dim'])
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']  # Nothing moved.


def test_only_unreadable_checkpoints_is_an_error(tmp_path, env):
  train_testing.run_main(tmp_path, env=env, num_train_steps=2, eval_every_steps=0)
  os.remove(tmp_path / 'checkpoints' / '2' / 'state' / '_METADATA')
  result = train_testing.run_main(tmp_path, env=env, check=False, num_train_steps=2,
                                  eval_every_steps=0)
  assert result.returncode != 0
  assert 'No checkpoint in' in result.stderr and 'could be restored (steps [2]' in result.stderr
  assert os.listdir(tmp_path / 'checkpoints') == ['2']  # Left for a person to look at.


def test_gradient_accumulation_matches_the_full_batch(tmp_path, env):
  common = dict(num_train_steps=3, log_every_steps=1, eval_every_steps=0,
                model__dtype='float32')
  train_testing.run_main(tmp_path / 'full', env=env, **common)
  train_testing.run_main(tmp_path / 'accumulated', env=env, grad_accum_steps=4, **common)

  for a, b in zip(train_testing.read_metrics(tmp_path / 'full'),
                  train_testing.read_metrics(tmp_path / 'accumulated')):
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
    assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-4)
  config = train_testing.tiny_config(**common)
  _, full = train_testing.restore_state(config, tmp_path / 'full')
  _, accumulated = train_testing.restore_state(config, tmp_path / 'accumulated')
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eval_mode_from_the_command_line(tmp_path, env):
  train_testing.run_main(tmp_path, env=env, num_train_steps=2, eval_every_steps=0)
  result = train_testing.run_python(
      ['-m', 'longjax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}', '--mode=eval',
       '--config.eval_seq_len=64'], env=env)
  assert 'eval of step 2' in result.stderr
  record, = train_testing.read_metrics(tmp_path, 'eval')
  assert record['step'] == 2 and record['seq_len'] == 64
  assert os.listdir(tmp_path / 'checkpoints') == ['2']  # Evaluation wrote nothing there.
