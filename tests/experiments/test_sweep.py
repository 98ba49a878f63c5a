"""The sweep's command line: checks before launching, a line per run, the failure table.

Most tests run `main` in-process on the flags a user types, with the launcher
replaced by a fake that writes a run's files (or fails) at once; one runs the
real `python -m experiments.sweep` and one a real failing `longjax.main`.
"""
import json
import os
import subprocess
import sys

import pytest

from experiments import sweep
from longjax import attention
from tests.experiments.fake_runs import simple_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VALID_KINDS = ', '.join(attention.KINDS)


def run_cli(monkeypatch, args, launch=None):
  """`python -m experiments.sweep ARGS` in this process; its exit status."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sweep, 'launch', launch or _must_not_launch)
  sweep.FLAGS.unparse_flags()
  try:
    sweep.FLAGS(['sweep', *args])
    return sweep.main(['sweep'])
  finally:
    sweep.FLAGS.unparse_flags()


def _must_not_launch(cmd, log_path):
  raise AssertionError(f'launched {cmd} (log {log_path})')


def _flag(cmd, name):
  return next(a.split('=', 1)[1] for a in cmd if a.startswith(f'--{name}='))


def test_unknown_kind_is_one_line_error_before_anything_runs(tmp_path):
  workdir = str(tmp_path / 'sweep')
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', '--config=configs/passkey.py',
       '--lengths=32,64', '--kinds=full,sliding', f'--workdir={workdir}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --kinds: unknown attention kind 'sliding'; valid kinds are: {VALID_KINDS}.")
  assert result.stdout == '' and not os.path.exists(workdir)


@pytest.mark.parametrize('args, error', [
    (['--lengths=32,abc'],
     "error: --lengths: 'abc' is not a positive integer; give it like --lengths=32,64,128."),
    (['--lengths=0'],
     "error: --lengths: '0' is not a positive integer; give it like --lengths=32,64,128."),
    (['--seeds=x'], "error: --seeds: 'x' is not a non-negative integer; give it like "
                    '--seeds=0,1,2.'),
    (['--set', 'model.atention.kind=local'],
     "error: --set model.atention.kind=local: config.model has no field 'atention' "
     "(did you mean 'attention'?); its fields are: "),
    (['--set', 'batch_size=abc'],
     "error: --set batch_size=abc: flag --config.batch_size=abc: invalid literal for int() "
     "with base 10: 'abc'"),
    (['--set', 'num_train_steps'],
     'error: --set num_train_steps: write field=value, e.g. --set num_train_steps=300.'),
    (['--set', 'model.max_len=16'],
     'error: --set model.max_len=16 is shorter than the longest of --lengths (64); raise it, '
     'or drop it and the sweep sets it.'),
    (['--config=configs/nope.py'], 'error: --config=configs/nope.py: no such file'),
])
def test_bad_arguments_are_one_line_errors(monkeypatch, capsys, tmp_path, args, error):
  argv = ['--config=configs/passkey.py', '--lengths=32,64', '--kinds=full,local',
          f'--workdir={tmp_path / "sweep"}', *args]
  assert run_cli(monkeypatch, argv) == 2
  out, err = capsys.readouterr()
  assert out == '' and len(err.splitlines()) == 1 and err.startswith(error), err
  assert not os.path.exists(tmp_path / 'sweep')


# What the fake runs log: their final eval, by (kind, length).
FINAL = {('full', 32): (0.5, 0.9023), ('full', 64): (0.75, 0.6781),
         ('local', 32): (1.5, 0.2633), ('local', 64): (2.25, 0.1336)}


def fake_launch(failing=()):
  """A launcher that writes each run's config.json and metrics.jsonl, or fails."""
  def launch(cmd, log_path):
    kind = _flag(cmd, 'config').split(':')[1]
    length, steps = int(_flag(cmd, 'config.seq_len')), int(_flag(cmd, 'config.num_train_steps'))
    workdir = _flag(cmd, 'workdir')
    if (kind, length) in failing:
      with open(log_path, 'a') as f:
        f.write(f'Traceback (most recent call last):\n  File "x.py", line 1\n'
                f'ValueError: boom: {kind} at {length}\n\n')
      return 1
    loss, accuracy = FINAL[(kind, length)]
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(dict(seed=0, seq_len=length, num_train_steps=steps,
                     model=dict(attention=dict(kind=kind))), f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for record in (dict(step=steps, split='train', loss=9.0),
                     dict(step=steps, split='eval', loss=loss, accuracy=accuracy,
                          seq_len=length),
                     dict(step=steps, split='eval', loss=7.0, accuracy=0.01,
                          seq_len=4 * length)):
        f.write(json.dumps(record) + '\n')
    return 0
  return launch


def test_sweep_reports_each_run_and_fails_with_a_table(monkeypatch, capsys, tmp_path):
  root = str(tmp_path / 'sweep')
  argv = ['--config=configs/passkey.py', '--lengths=32,64', '--kinds=full,local',
          f'--workdir={root}', '--seeds=0', '--set', 'num_train_steps=20']
  assert run_cli(monkeypatch, argv, fake_launch(failing={('local', 64)})) == 1
  lines = capsys.readouterr().out.splitlines()
  finished = [line for line in lines if ': finished in ' in line]
  assert [line.split(':')[0] for line in finished] == [
      '[1/4] full L=32 seed=0', '[2/4] full L=64 seed=0', '[3/4] local L=32 seed=0']
  assert finished[0].endswith('| step 20 | eval loss 0.5000 | accuracy 0.9023')
  assert finished[2].endswith('| step 20 | eval loss 1.5000 | accuracy 0.2633')
  log = os.path.join(root, 'local', 'L64_s0', 'sweep.log')
  failed = next(line for line in lines if line.startswith('[4/4]') and 'FAILED' in line)
  assert failed.startswith('[4/4] local L=64 seed=0: FAILED, exit code 1, after ')
  assert failed.endswith(f'| log {log}')
  table = lines[lines.index('1 of 4 runs failed:'):]
  assert table[2].split() == ['local', 'L=64', 'seed=0', 'exit', 'code', '1', log]
  assert table[3:] == ['      | Traceback (most recent call last):',
                       '      |   File "x.py", line 1', '      | ValueError: boom: local at 64']

  # Relaunched: the finished runs are skipped, the failed one runs again.
  assert run_cli(monkeypatch, argv, fake_launch()) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (f'[1/4] full L=32 seed=0: done already | step 20 | eval loss 0.5000 | '
                      f'accuracy 0.9023 | {os.path.join(root, "full", "L32_s0")}')
  assert lines[-2].startswith('[4/4] local L=64 seed=0: finished in ')
  assert lines[-2].endswith('| eval loss 2.2500 | accuracy 0.1336')
  assert lines[-1].startswith('4 of 4 runs finished')


def test_print_only_prints_the_commands_and_runs_nothing(monkeypatch, capsys, tmp_path):
  root = str(tmp_path / 'sweep')
  argv = ['--config=configs/passkey.py', '--lengths=32,100000', '--kinds=local',
          f'--workdir={root}', '--seeds=0', '--set', 'num_train_steps=7', '--print_only']
  assert run_cli(monkeypatch, argv) == 0
  out, err = capsys.readouterr()
  commands = [line.split() for line in out.splitlines()]
  assert [_flag(c, 'config.seq_len') for c in commands] == ['32', '100000']
  assert all(c[1:4] == ['-m', 'longjax.main', '--config=configs/passkey.py:local'] and
             '--config.num_train_steps=7' in c and '--config.model.max_len=100000' in c
             for c in commands)
  assert 'note: model.max_len raised' in err and 'to 100000' in err
  assert not os.path.exists(root)


@pytest.mark.slow
def test_a_failing_longjax_main_fails_the_sweep(tmp_path):
  """A real run that stops before compiling: the mesh asks for 3 devices, there is 1."""
  root = str(tmp_path / 'sweep')
  env = dict(os.environ, JAX_PLATFORMS='cpu', LONGJAX_CONFIG_SIZE='')
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', '--config=configs/passkey.py', '--size=tiny',
       '--lengths=32', '--kinds=full', '--seeds=0', '--set', 'mesh.data=3',
       f'--workdir={root}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  assert lines[1].startswith('[1/1] full L=32 seed=0: FAILED, exit code 1, after ')
  table = lines[lines.index('1 of 1 runs failed:'):]
  assert table[2].split()[-1] == os.path.join(root, 'full', 'L32_s0', 'sweep.log')
  assert any('mesh' in line for line in table[3:]), table


def test_plan_gives_one_workdir_per_combination_and_skips_finished(tmp_path):
  runs = sweep.plan(str(tmp_path), ['full', 'local'], [32, 64], [0, 1])
  assert len(runs) == 8 and len({r.workdir for r in runs}) == 8
  cmd = runs[0].command('configs/passkey.py', 'tiny', ['num_train_steps=5'])
  assert cmd[1:] == ['-m', 'longjax.main', '--config=configs/passkey.py:full,tiny',
                     f'--workdir={runs[0].workdir}', '--config.seq_len=32', '--config.seed=0',
                     '--config.num_train_steps=5']
  done = simple_run(str(tmp_path), 'full', 32, 0, 0.5, [1, 1], last_step=20)
  assert runs[0].workdir == done and sweep.is_finished(done)
  unfinished = simple_run(str(tmp_path / 'x'), 'local', 32, 0, 0.5, [1, 1], last_step=20)
  with open(os.path.join(unfinished, 'config.json')) as f:
    config = json.load(f)
  config['num_train_steps'] = 40
  with open(os.path.join(unfinished, 'config.json'), 'w') as f:
    json.dump(config, f)
  assert not sweep.is_finished(unfinished)
  assert not sweep.is_finished(str(tmp_path / 'missing'))


def _print_only(monkeypatch, capsys, tmp_path, *args, kinds='local', lengths='128,512,2048'):
  argv = ['--config=configs/pretrain.py', f'--lengths={lengths}', f'--kinds={kinds}',
          f'--workdir={tmp_path / "s"}', '--seeds=0', '--print_only', *args]
  status = run_cli(monkeypatch, argv)
  out, err = capsys.readouterr()
  return status, [line.split() for line in out.splitlines()], err


def test_tokens_per_batch_keeps_tokens_per_step_and_refuses_too_few_sequences(
    monkeypatch, capsys, tmp_path):
  status, commands, err = _print_only(monkeypatch, capsys, tmp_path, '--tokens_per_batch=65536')
  assert status == 0, err
  assert [int(_flag(c, 'config.batch_size')) for c in commands] == [512, 128, 32]
  assert 'protocol: tokens per step fixed: 65536' in err
  status, commands, err = _print_only(monkeypatch, capsys, tmp_path, '--tokens_per_batch=4096')
  assert status == 2 and commands == []
  assert err.startswith('error: --tokens_per_batch=4096 gives 8 sequences per step at length 512, '
                        'fewer than --min_sequences=16')
  status, _, err = _print_only(monkeypatch, capsys, tmp_path, '--tokens_per_batch=1000')
  assert status == 2 and 'is not a multiple of length 128' in err


def test_sequences_per_step_holds_documents_fixed_with_accumulation(monkeypatch, capsys, tmp_path):
  status, commands, err = _print_only(monkeypatch, capsys, tmp_path, '--sequences_per_step=16',
                                      '--micro_tokens=8192')
  assert status == 0, err
  shapes = [(int(_flag(c, 'config.batch_size')), int(_flag(c, 'config.grad_accum_steps')))
            for c in commands]
  # 16 sequences at every length; micro-batches of at most 8192 tokens: 16 x 128,
  # 16 x 512 = 8192, 16 x 2048 in 4 micro-batches of 4.
  assert shapes == [(16, 1), (16, 1), (16, 4)]
  assert 'documents per step fixed: 16 sequences' in err


def test_match_keys_sets_each_kinds_budget_param_per_length(monkeypatch, capsys, tmp_path):
  status, commands, err = _print_only(
      monkeypatch, capsys, tmp_path, '--match=keys', '--budget=64', '--set',
      'model.attention.num_global=8', '--set', 'model.attention.summary_block=64',
      kinds='full,local,global_local,transient_global', lengths='256,1024')
  assert status == 0, err
  settings = {(_flag(c, 'config').split(':')[1], int(_flag(c, 'config.seq_len'))):
              [a for a in c if a.startswith('--config.model.attention.radius')] for c in commands}
  # Causal LM: local sees r + 1 keys, global_local r + 1 + g, transient_global
  # r + 1 + (L - 1) // k summaries (LongT5's, of the blocks that ended).
  assert settings['full', 256] == []
  assert settings['local', 256] == settings['local', 1024] == ['--config.model.attention.radius=63']
  assert settings['global_local', 1024] == ['--config.model.attention.radius=55']
  assert settings['transient_global', 256] == ['--config.model.attention.radius=60']
  assert settings['transient_global', 1024] == ['--config.model.attention.radius=48']
  assert 'attention budget: keys per query <= 64' in err


@pytest.mark.parametrize('args, error', [
    (['--match=keys'], 'error: --match and --budget go together'),
    (['--match=keys', '--budget=64', '--set', 'model.attention.radius=8'],
     'error: --set model.attention.radius conflicts with --match=keys'),
    (['--match=keys', '--budget=4', '--set', 'model.attention.summary_block=16'],
     'error: transient_global at length 128: even radius=1 costs 9 keys per query, more than '
     '--budget=4 keys (its length / summary_block summaries alone'),
    (['--sequences_per_step=16', '--tokens_per_batch=4096'], 'error: give --tokens_per_batch'),
    (['--micro_tokens=64'], 'error: --micro_tokens splits --sequences_per_step'),
    (['--sequences_per_step=16', '--set', 'batch_size=4'],
     'error: --set batch_size / grad_accum_steps conflict'),
    (['--learning_rates=1e-3,-1'], "error: --learning_rates: '-1' is not a positive number"),
])
def test_protocol_arguments_are_checked(monkeypatch, capsys, tmp_path, args, error):
  status, commands, err = _print_only(monkeypatch, capsys, tmp_path, *args,
                                      kinds='local,transient_global', lengths='128')
  assert status == 2 and commands == [] and err.startswith(error), err


def test_learning_rates_are_a_sweep_dimension_and_the_protocol_is_written(monkeypatch, capsys,
                                                                           tmp_path):
  status, commands, err = _print_only(monkeypatch, capsys, tmp_path,
                                      '--learning_rates=1e-3,3e-3', lengths='128')
  assert status == 0, err
  assert [_flag(c, 'config.learning_rate') for c in commands] == ['0.001', '0.003']
  assert [_flag(c, 'workdir').rsplit('/', 1)[1] for c in commands] == ['L128_lr0.001_s0',
                                                                       'L128_lr0.003_s0']
  root = str(tmp_path / 'w')
  argv = ['--config=configs/pretrain.py', '--lengths=128', '--kinds=local', f'--workdir={root}',
          '--seeds=0', '--sequences_per_step=16', '--match=keys', '--budget=32', '--set',
          'num_train_steps=20']
  assert run_cli(monkeypatch, argv, lambda cmd, log: 0) == 0  # a launcher that does nothing
  with open(os.path.join(root, 'sweep.json')) as f:
    written = json.load(f)
  assert written['batch_size'] == {'128': 16} and written['seeds'] == [0]
  assert written['settings'] == {'local': {'128': {'radius': 31, 'keys_per_query': 32}}}
  assert written['num_train_steps'] == 20 and 'flat' in written['criterion']


def test_ruler_suite_prints_one_run_per_task_kind_and_length(monkeypatch, capsys, tmp_path):
  argv = ['--suite=ruler', '--tasks=niah_multikey,variable_tracking,passkey', '--lengths=128,256',
          '--kinds=full,local', f'--workdir={tmp_path}', '--seeds=0', '--print_only']
  assert run_cli(monkeypatch, argv) == 0
  commands = [line.split() for line in capsys.readouterr().out.splitlines()]
  assert len(commands) == 3 * 2 * 2
  configs = {_flag(cmd, 'config') for cmd in commands}
  assert configs == {'configs/ruler.py:niah_multikey,full', 'configs/ruler.py:niah_multikey,local',
                     'configs/ruler.py:variable_tracking,full',
                     'configs/ruler.py:variable_tracking,local',
                     'configs/passkey.py:full', 'configs/passkey.py:local'}
  workdirs = {_flag(cmd, 'workdir') for cmd in commands}
  assert str(tmp_path / 'variable_tracking' / 'local' / 'L256_s0') in workdirs


@pytest.mark.parametrize('args, error', [
    (['--suite=ruler', '--tasks=niah_single,haystack'], 'error: --tasks: haystack not in'),
    (['--suite=ruler', '--config=configs/passkey.py'], 'error: give --config'),
    ([], 'error: give --config'),
])
def test_suite_arguments_are_checked(monkeypatch, capsys, tmp_path, args, error):
  argv = ['--lengths=128', '--kinds=local', f'--workdir={tmp_path / "s"}', *args]
  assert run_cli(monkeypatch, argv) == 2
  assert capsys.readouterr().err.startswith(error)
