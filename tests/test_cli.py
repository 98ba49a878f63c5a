"""`python -m longjax.main` exactly as a user types it: --help, --print_config, config names,
clean FATAL lines for bad input, the closing line, and eval/decode of the trained run."""
import json
import os
import re

import pytest

from longjax import attention
from tests.train import train_testing

pytestmark = pytest.mark.slow  # Every test here starts `python -m longjax.main`.


def _main(*args, env=None):
  return train_testing.run_python(['-m', 'longjax.main', *args],
                                  env=env or train_testing.subprocess_env(), check=False)


def _assert_clean_failure(result, *expected):
  """Exit 1 with FATAL lines naming what is wrong, and no traceback."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  fatal = [line for line in result.stderr.splitlines() if line.startswith('FATAL ')]
  assert fatal, result.stderr[-3000:]
  for text in expected:
    assert text in result.stderr, (text, result.stderr[-3000:])


@pytest.fixture(scope='module')
def trained(tmp_path_factory, compile_cache):
  """configs/tiny.py trained with full attention (20 steps), shared by the eval tests."""
  workdir = tmp_path_factory.mktemp('cli_trained')
  env = train_testing.subprocess_env(cache_dir=compile_cache)
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', env=env)
  assert result.returncode == 0, result.stderr[-6000:]
  return workdir, env, result


def test_help_exits_0_and_lists_configs_kinds_and_modes():
  result = _main('--help')
  assert result.returncode == 0, result.stderr[-3000:]
  for word in ['pretrain', 'tiny', 'passkey', *attention.KINDS, 'train', 'eval', 'decode',
               '--print_config', '--workdir', '--mode']:
    assert word in result.stdout, word


def test_print_config_resolves_a_config_name_its_argument_and_overrides():
  result = _main('--config=pretrain:local,tiny', '--print_config', '--config.batch_size=3')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert "config.model.attention.kind = 'local'" in lines  # The argument's kind.
  assert 'config.seq_len = 64' in lines  # The argument's size.
  assert 'config.batch_size = 3' in lines  # The override.
  assert "config.dataset.name = 'longjax_pystdlib'" in lines  # The config file's own.
  assert 'config.model.attention.layer_pattern = ()' in lines  # A default.


@pytest.mark.parametrize('args, expected', [
    (['--config=nope'], ["--config=nope: there is no config named 'nope'", 'tiny']),
    (['--config=configs/nope.py'], ["--config=configs/nope.py: no such file", 'pretrain']),
    (['--config=configs/pretrain.py:sliding'], ["Unknown config argument 'sliding'"]),
    (['--config=tiny', '--config.model.attention.kind=sliding'],
     ["config.model.attention.kind: unknown attention kind 'sliding'", 'full, local']),
    (['--config=tiny', '--config.mesh.data=2'], ['config.mesh', '2 devices but there are 1']),
    (['--config=tiny', '--config.seq_len=4096'],
     ['config.seq_len = 4096', 'raise model.max_len']),
    (['--config=tiny', '--workdir=/proc/longjax_run'],
     ['--workdir=/proc/longjax_run cannot be created']),
])
def test_bad_input_is_one_clean_fatal_line(args, expected, tmp_path):
  workdir = tmp_path / 'run'
  if not any(arg.startswith('--workdir') for arg in args):
    args = [*args, f'--workdir={workdir}']
  _assert_clean_failure(_main(*args), *expected)
  assert not workdir.exists() or not (workdir / 'checkpoints').exists()


def test_a_file_as_workdir_names_the_flag(tmp_path):
  (tmp_path / 'file').write_text('')
  _assert_clean_failure(_main('--config=tiny', f'--workdir={tmp_path / "file"}'),
                        f'--workdir={tmp_path / "file"} is a file, not a directory')


def test_cpu_runs_do_not_log_the_tpu_probe(tmp_path):
  env = train_testing.subprocess_env()
  del env['JAX_PLATFORMS']  # As a user runs it: JAX probes for a TPU, then a GPU.
  # Fails in validation, after JAX has picked its platform.
  result = _main('--config=tiny', f'--workdir={tmp_path}', '--config.seq_len=4096', env=env)
  _assert_clean_failure(result, 'config.seq_len = 4096')
  assert "Unable to initialize backend 'tpu'" not in result.stderr + result.stdout
  platform = re.search(r'Running on \d+ (CPU|GPU|TPU) devices?( \(no GPU or TPU found\))?\.',
                       result.stderr)
  assert platform, result.stderr[-3000:]
  assert platform.group(1) != 'CPU' or platform.group(2)


def test_a_training_run_ends_with_one_summary_line(trained):
  workdir, _, result = trained
  assert 'Running on 1 CPU device (JAX_PLATFORMS=cpu).' in result.stderr
  last = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r'train done \| steps 0->20 of 20 \| train loss \d+\.\d{4} \| eval loss '
                      r'\d+\.\d{4} \(seq_len 32\) \| [\d,]+ tokens/s \| \d+:\d\d:\d\d wall \| '
                      r'workdir ' + re.escape(str(workdir)), last), last
  assert last in result.stderr  # Logged at INFO too.


@pytest.mark.parametrize('mode', ['eval', 'decode'])
def test_eval_and_decode_refuse_another_model_than_the_trained_one(trained, mode):
  workdir, env, _ = trained
  before = (workdir / 'metrics.jsonl').read_text()
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', f'--mode={mode}',
                 '--config.model.attention.kind=local', env=env)
  _assert_clean_failure(result, f"--mode={mode} uses the trained run's settings",
                        "config.model.attention.kind: saved 'full', given 'local'",
                        '--config.model.attention.kind=full')
  assert (workdir / 'metrics.jsonl').read_text() == before


def test_eval_with_the_training_config_scores_the_saved_weights(trained):
  workdir, env, _ = trained
  final_eval = train_testing.read_metrics(workdir, 'eval')[-1]
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', '--mode=eval', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  record = train_testing.read_metrics(workdir)[-1]
  assert (record['split'], record['step'], record['seq_len']) == ('eval', 20, 32)
  assert record['loss'] == pytest.approx(final_eval['loss'], rel=1e-5)
  assert result.stdout.strip().splitlines()[-1].startswith(
      f'eval done | step 20 | eval loss {record["loss"]:.4f} (seq_len 32) |')


def test_eval_at_another_length_evaluates_the_saved_model(trained):
  workdir, env, _ = trained
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', '--mode=eval',
                 '--config.eval_seq_len=64', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  record = train_testing.read_metrics(workdir)[-1]
  assert (record['split'], record['step'], record['seq_len']) == ('eval', 20, 64)
  # Trained, not fresh: the untrained loss is about ln(259) = 5.56 nats.
  assert record['loss'] < 5.3, record
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['attention']['kind'] == 'full' and saved['eval_seq_len'] == -1
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']  # Evaluation wrote none.


def test_readme_layer_pattern_flag_trains(tmp_path, compile_cache):
  """The README's per-layer flag, verbatim (it failed with "unknown attention kind
  'local,local,local,full'" when ml-collections kept the comma form as one string)."""
  with open(os.path.join(train_testing.REPO_ROOT, 'README.md'), encoding='utf-8') as f:
    flag = re.search(r'--config\.model\.attention\.layer_pattern=[a-z_,]+', f.read()).group(0)
  assert flag == '--config.model.attention.layer_pattern=local,local,local,full'
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', flag,
                 '--config.model.num_layers=4', '--config.num_train_steps=1',
                 '--config.eval_every_steps=0',
                 env=train_testing.subprocess_env(cache_dir=compile_cache))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tmp_path, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)['model']['attention']['layer_pattern']
  from longjax.models import config as model_config  # pylint: disable=g-import-not-at-top
  assert model_config.parse_layer_pattern(saved) == ('local', 'local', 'local', 'full')
