"""Fixtures for the data tests: small configs reading the session's tfds data dir
(`data_dir`, tests/conftest.py), where the embedded datasets are built once."""
import functools

import pytest

from tests.data import data_testing


@pytest.fixture(scope='session')
def make_config(data_dir):
  """make_config(**overrides): see data_testing.small_config."""
  return functools.partial(data_testing.small_config, data_dir)


@pytest.fixture(scope='session')
def make_data_config(data_dir):
  """make_data_config(**overrides): see data_testing.small_data_config."""
  return functools.partial(data_testing.small_data_config, data_dir)
