import pytest


@pytest.fixture(scope='session')
def tfds_data_dir(tmp_path_factory):
  """A fresh tfds data dir: the embedded datasets are built into it on first use."""
  return str(tmp_path_factory.mktemp('tfds_data'))
