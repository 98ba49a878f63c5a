"""A run killed (SIGKILL), preempted (SIGTERM, even twice) or interrupted (SIGINT) and
restarted ends bitwise where an
uninterrupted run ends: parameters, optimizer state and every logged loss.

All runs are `python -m longjax.main` subprocesses on a 2-device mesh (fsdp=2,
so checkpoints hold sharded arrays) with the same flags.
"""
import os
import signal

import pytest

from tests.train import train_testing

# Every test here trains in `python -m longjax.main` subprocesses.
pytestmark = pytest.mark.slow

OVERRIDES = dict(num_train_steps=12, checkpoint_every_steps=4, keep_checkpoints=2,
                 log_every_steps=1, eval_every_steps=6, mesh__data=1, mesh__fsdp=2,
                 model__dropout_rate=0.1)  # Dropout: the masks must resume too.


def _main_args(workdir):
  return (['--config=configs/tiny.py', f'--workdir={workdir}']
          + train_testing.overrides_to_flags(**OVERRIDES))


@pytest.fixture(scope='module')
def env(compile_cache):
  return train_testing.subprocess_env(num_devices=2, cache_dir=compile_cache)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  train_testing.run_python(['-m', 'longjax.main'] + _main_args(workdir), env=env)
  return workdir


def _final_state(workdir):
  # Restored onto this process's one device.
  config = train_testing.tiny_config(**dict(OVERRIDES, mesh__data=-1, mesh__fsdp=1))
  step, state = train_testing.restore_state(config, workdir)
  assert step == OVERRIDES['num_train_steps']
  return state


@pytest.mark.parametrize('signal_name, at_step, when, exit_code, resumes_from', [
    ('KILL', 6, 'after_log', -signal.SIGKILL, [4]),  # Between two checkpoints.
    ('KILL', 8, 'after_save', -signal.SIGKILL, [4, 8]),  # Mid-save: 8 may be incomplete.
    ('TERM', 5, 'after_log', 143, [6]),  # Preemption: saves the next step, exits 143.
    ('INT', 5, 'after_log', 130, [6]),  # Ctrl-C: the same, exits 130.
    ('TERM', 5, 'twice', 143, [6]),  # A second SIGTERM during that save is ignored.
])
def test_interrupted_run_resumes_bitwise(signal_name, at_step, when, exit_code, resumes_from,
                                         reference, env, tmp_path):
  first = train_testing.run_python(
      [os.path.join(train_testing.TESTS_DIR, 'run_and_die.py'), signal_name, str(at_step), when]
      + _main_args(tmp_path), env=env, check=False)
  assert first.returncode == exit_code, first.stderr[-3000:]
  saved = sorted(int(name) for name in os.listdir(tmp_path / 'checkpoints') if name.isdigit())
  assert saved and saved[-1] in resumes_from and saved[-1] < OVERRIDES['num_train_steps']

  second = train_testing.run_python(['-m', 'longjax.main'] + _main_args(tmp_path), env=env)
  assert f'Restored the checkpoint at step {saved[-1]}' in second.stderr, second.stderr[-3000:]

  train_testing.assert_trees_equal(_final_state(reference), _final_state(tmp_path))
  expected = [(r['step'], r['split'], r['loss']) for r in train_testing.read_metrics(reference)]
  actual = [(r['step'], r['split'], r['loss']) for r in train_testing.read_metrics(tmp_path)]
  assert actual == expected  # Bitwise losses, and no step logged twice.
