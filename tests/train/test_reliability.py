"""Resuming the wrong run, two trainers on one workdir, and what a resume may change
(the reliability audit's H2, M1, M2, M5, L6): each reproduced, then refused or
recorded as the trainer now promises."""
import json
import os

import pytest

from longjax.train import run_identity
from longjax.train import trainer
from longjax.train import workdir_lock
from tests.train import train_testing

STEPS = dict(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=0, log_every_steps=2)


def _trained(workdir, **overrides):
  trainer.train_and_evaluate(train_testing.tiny_config(**STEPS, **overrides), workdir)
  return sorted(os.listdir(workdir / 'checkpoints'))


def _history(workdir):
  with open(workdir / run_identity.HISTORY_FILE, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _saved_config(workdir):
  with open(workdir / 'config.json', encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.parametrize('overrides, field, saved', [
    (dict(model__attention__kind='local'), 'config.model.attention.kind', "'full'"),
    (dict(seed=1), 'config.seed', '0'),
    (dict(dataset__name='associative_recall'), 'config.dataset.name', "'passkey'"),
])
def test_resume_that_changes_the_run_is_refused_before_anything_moves(
    overrides, field, saved, tmp_path):
  before = _trained(tmp_path)
  config_before = _saved_config(tmp_path)
  with pytest.raises(run_identity.RunIdentityError) as error:
    trainer.train_and_evaluate(
        train_testing.tiny_config(**dict(STEPS, num_train_steps=6), **overrides), tmp_path)
  message = str(error.value)
  assert field in message and f'saved {saved}' in message
  assert '--allow_config_change=' + field.removeprefix('config.') in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before  # nothing moved
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  assert _saved_config(tmp_path) == config_before  # the record of what was trained is kept
  assert [r['event'] for r in _history(tmp_path)] == ['start']


def test_allowed_identity_change_resumes_the_latest_step_with_a_fresh_data_stream(tmp_path):
  """A new seed was taken for a corrupt checkpoint: the latest step went to
  checkpoints_corrupt/ and the run went back two steps (audit H2)."""
  _trained(tmp_path)
  config = train_testing.tiny_config(**dict(STEPS, num_train_steps=6), seed=1)
  trainer.train_and_evaluate(config, tmp_path, allow_config_change=['seed'])
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  starts = _history(tmp_path)
  assert [(r['event'], r['step']) for r in starts] == [('start', 0), ('resume', 4)]
  assert starts[1]['changed']['seed'] == dict(saved=0, given=1)
  assert starts[1]['changed']['num_train_steps'] == dict(saved=4, given=6)
  assert _saved_config(tmp_path)['seed'] == 1  # config.json: the latest start
  assert max(r['step'] for r in train_testing.read_metrics(tmp_path, 'train')) == 6


def test_schedule_changes_are_accepted_and_recorded(tmp_path):
  """Learning rate, steps and clipping (1.0 -> 0 was a checkpoint mismatch, L6)."""
  _trained(tmp_path, grad_clip=1.0)
  config = train_testing.tiny_config(**dict(STEPS, num_train_steps=6), learning_rate=1e-4,
                                     grad_clip=0.0)
  trainer.train_and_evaluate(config, tmp_path)
  changed = _history(tmp_path)[-1]['changed']
  assert set(changed) == {'learning_rate', 'grad_clip', 'num_train_steps'}
  assert changed['grad_clip'] == dict(saved=1.0, given=0.0)


def test_unknown_allowed_field_is_refused(tmp_path):
  _trained(tmp_path)
  with pytest.raises(run_identity.RunIdentityError, match='model.attention.knd'):
    trainer.train_and_evaluate(train_testing.tiny_config(**STEPS), tmp_path,
                               allow_config_change=['model.attention.knd'])


def test_second_trainer_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
      trainer.train_and_evaluate(train_testing.tiny_config(**STEPS), tmp_path)
  assert f'pid {os.getpid()}' in str(error.value) and 'another trainer' in str(error.value)
  assert not (tmp_path / 'checkpoints').exists()
  # Released: the next trainer runs.
  _trained(tmp_path)


def test_a_dead_holders_record_is_taken_over_and_reported(tmp_path, caplog):
  dead = 2 ** 22 + 12345  # above the default pid_max: no such process
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      dict(host=os.uname().nodename, pid=dead, since='yesterday')))
  with caplog.at_level('WARNING'), caplog.at_level('WARNING', logger='absl'):
    with workdir_lock.hold(str(tmp_path)):
      held = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
  assert held['pid'] == os.getpid()
  assert f'pid {dead}' in caplog.text and 'taking it over' in caplog.text


@pytest.mark.slow  # Two `python -m longjax.main` processes.
def test_two_trainers_from_the_command_line(tmp_path, compile_cache):
  env = train_testing.subprocess_env(cache_dir=compile_cache)
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  first = subprocess.Popen(
      [sys.executable, '-m', 'longjax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}']
      + train_testing.overrides_to_flags(num_train_steps=100_000, eval_every_steps=0),
      cwd=train_testing.REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.time() + 120
    lock = tmp_path / workdir_lock.LOCK_FILE
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
      time.sleep(0.2)
    second = train_testing.run_main(tmp_path, env=env, check=False, num_train_steps=2)
    assert second.returncode == 1, second.stderr[-2000:]
    assert f'pid {first.pid}' in second.stderr and 'another trainer' in second.stderr
  finally:
    first.terminate()
    first.wait(timeout=120)
