"""The task configs ship with the package (longjax/configs/) and load from any directory;
`--config=configs/<name>.py` from the repository root loads the same config by path."""
import glob
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from absl import flags
from ml_collections import config_flags

from tests.testing import CONFIGS_DIR, REPO_ROOT

PATH_FORM_DIR = os.path.join(REPO_ROOT, 'configs')


def _names(directory):
  return sorted(os.path.splitext(os.path.basename(path))[0]
                for path in glob.glob(os.path.join(directory, '*.py'))
                if not os.path.basename(path).startswith('_'))


def test_every_packaged_config_has_its_path_form_file():
  assert _names(PATH_FORM_DIR) == _names(CONFIGS_DIR)
  assert {'base', 'tiny', 'pretrain', 'translate', 'summarize', 'passkey',
          'associative_recall', 'ruler'} <= set(_names(CONFIGS_DIR))


def _load_by_flag(spec):
  """The config `--config=<spec>` gives, parsed by ml_collections' flag as longjax.main's is."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=flag_values,
                                  lock_config=True)
  flag_values(['prog', f'--config={spec}'])
  return flag_values.config


@pytest.mark.parametrize('name', _names(CONFIGS_DIR))
def test_path_form_loads_the_packaged_config(name, monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  packaged = importlib.import_module(f'longjax.configs.{name}')
  assert _load_by_flag(f'configs/{name}.py').to_dict() == packaged.get_config().to_dict()


def test_path_form_passes_the_argument(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  config = _load_by_flag('configs/pretrain.py:local,tiny')
  assert config.model.attention.kind == 'local' and config.seq_len == 64


@pytest.mark.slow
def test_the_built_package_holds_every_config(tmp_path):
  """What `pip install .` installs, built by setup.py from a copy of the package, imports
  every config in a fresh environment, from a directory with no checkout in it."""
  source = tmp_path / 'source'
  shutil.copytree(os.path.join(REPO_ROOT, 'longjax'), source / 'longjax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(REPO_ROOT, 'setup.py'), source)
  built = tmp_path / 'built'
  subprocess.run([sys.executable, 'setup.py', '-q', 'build_py', f'--build-lib={built}'],
                 cwd=source, check=True, capture_output=True)
  # A fresh venv that sees the built package and this environment's dependencies, but not
  # this environment's .pth files: one is the editable install's finder, which would
  # still find longjax/configs in the checkout if the build left it out.
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                        check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, 'longjax_test.pth'), 'w') as f:
    f.write('\n'.join(dict.fromkeys([str(built), sysconfig.get_path('purelib'),
                                      sysconfig.get_path('platlib')])) + '\n')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  code = ('import importlib\n'
          f'for name in {_names(CONFIGS_DIR)!r}:\n'
          '  module = importlib.import_module(f"longjax.configs.{name}")\n'
          '  module.get_config()\n'
          '  print(module.__file__)\n')
  result = subprocess.run([python, '-c', code], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [str(built / 'longjax' / 'configs' / f'{name}.py')
                                   for name in _names(CONFIGS_DIR)]
