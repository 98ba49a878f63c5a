"""Helpers shared by the data tests (importable: pytest puts this folder on sys.path)."""
import importlib.util
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(REPO_ROOT, 'configs')


def load_config_module(path):
  """Imports a config file by path (configs/ is not an installed package)."""
  name = 'longjax_test_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def small_config(data_dir, **overrides):
  """configs/base.py's config, small, reading and building in `data_dir`.

  Overrides use '__' for nesting: small_config(d, dataset__name='passkey').
  """
  config = load_config_module(os.path.join(CONFIGS_DIR, 'base.py')).get_config()
  config.dataset.data_dir = data_dir
  config.seq_len = 64
  config.target_len = 32
  config.batch_size = 4
  config.dataset.prefetch = 0
  for key, value in overrides.items():
    *parents, leaf = key.split('__')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def sword_modules_installed():
  from longjax.data import sword  # pylint: disable=g-import-not-at-top
  try:
    sword.find_module(sword.ENGLISH_MODULE)
    sword.find_module(sword.SPANISH_MODULE)
  except sword.SwordModuleNotFoundError:
    return False
  return True


requires_sword = pytest.mark.skipif(
    not sword_modules_installed(),
    reason='needs `apt-get install sword-text-web sword-text-sparv` (.ci/run installs them)')


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert sorted(want) == sorted(got)
    for key in want:
      if isinstance(want[key], list):
        assert want[key] == got[key], key
      else:
        assert want[key].dtype == got[key].dtype, key
        assert (want[key] == got[key]).all(), key
