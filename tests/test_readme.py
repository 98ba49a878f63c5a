"""The README's commands are the ones that work: quick start, the config-name form from
outside the repository, and the test command."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from longjax.configs import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(prefix):
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = re.findall(r'```sh\n(.*?)```', f.read(), flags=re.S)
  return [line.strip() for block in blocks for line in block.splitlines()
          if line.strip().startswith(prefix)]


def test_ci_runs_the_readme_test_commands():
  """CI runs every README pytest line: the default suite, then the slow tests."""
  commands = readme_commands('python -m pytest')
  assert commands == ['python -m pytest -q -n 2 -m "not slow"', 'python -m pytest -q -n 2 -m slow']
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci = f.read()
  assert "grep '^python -m pytest' README.md" in ci and 'for cmd in' in ci
  listed = subprocess.run(['bash', '-c', "grep '^python -m pytest' README.md"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.splitlines()
  assert listed == commands


def test_quickstart_command_trains(tmp_path):
  """The first `python -m longjax.main` line of the README, as written, with the
  size shrunk through LONGJAX_CONFIG_SIZE and the workdir moved to a temp dir."""
  command = readme_commands('python -m longjax.main')[0]
  assert command == ('python -m longjax.main --config=configs/pretrain.py '
                     '--workdir=/tmp/longjax_quickstart')
  argv = shlex.split(command.replace('/tmp/longjax_quickstart', str(tmp_path / 'run')))
  env = dict(os.environ, LONGJAX_CONFIG_SIZE='tiny', TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  result = subprocess.run([sys.executable] + argv[1:], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    records = f.read()
  assert '"split": "train"' in records and '"split": "eval"' in records
  assert os.listdir(tmp_path / 'run' / 'checkpoints')


@pytest.mark.slow
def test_config_name_form_trains_from_any_directory(tmp_path, monkeypatch):
  """The README's `--config=pretrain` line, as written, run from a directory outside the
  repository (the config comes from the installed package), tiny and in a temp workdir."""
  command = readme_commands('python -m longjax.main --config=pretrain ')[0]
  assert command == 'python -m longjax.main --config=pretrain --workdir=/tmp/run'
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  argv = shlex.split(command.replace('/tmp/run', str(tmp_path / 'run')))
  env = dict(os.environ, LONGJAX_CONFIG_SIZE='tiny', TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  result = subprocess.run([sys.executable] + argv[1:], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'run' / 'config.json') as f:
    trained = json.load(f)
  monkeypatch.setenv('LONGJAX_CONFIG_SIZE', 'tiny')
  expected = pretrain.get_config()
  for field in ('seq_len', 'learning_rate', 'warmup_steps', 'batch_size'):
    assert trained[field] == expected[field], field  # pretrain's, not another config's.
  assert os.listdir(tmp_path / 'run' / 'checkpoints')
