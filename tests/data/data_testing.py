"""Helpers shared by the data tests."""
import pytest

from longjax import data
from tests.testing import CONFIGS_DIR, REPO_ROOT, load_config_module, override  # noqa: F401


def small_config(data_dir, **overrides):
  """longjax/configs/base.py's config, small, reading and building in `data_dir`.

  Overrides use '__' for nesting: small_config(d, dataset__name='passkey').
  """
  config = load_config_module('base').get_config()
  config.dataset.data_dir = data_dir
  config.seq_len = 64
  config.target_len = 32
  config.batch_size = 4
  config.dataset.prefetch = 0
  return override(config, **overrides)


def small_data_config(data_dir, **overrides):
  """small_config(data_dir, **overrides) as the data layer takes it: a DataConfig."""
  return data.DataConfig.from_config(small_config(data_dir, **overrides))


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
