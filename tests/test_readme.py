"""The README's commands are the ones that work: quick start and test command."""
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(prefix):
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = re.findall(r'```sh\n(.*?)```', f.read(), flags=re.S)
  return [line.strip() for block in blocks for line in block.splitlines()
          if line.strip().startswith(prefix)]


def test_ci_runs_the_readme_test_command():
  command = readme_commands('python -m pytest')[0]
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci = f.read()
  assert "grep -m1 '^python -m pytest' README.md" in ci
  assert command.startswith('python -m pytest')


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
