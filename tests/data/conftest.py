"""Fixtures for the data tests: one tfds data dir per session, and small configs.

The embedded datasets build in seconds, so a session builds each once into a
temporary data dir that the tests share (they only read it).
"""
import functools
import os
import sys

import pytest

# pytest imports this folder as the namespace package `tests.data`, which does
# not put it on sys.path; the test modules import their helpers by plain name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_testing  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds_data'))


@pytest.fixture(scope='session')
def make_config(data_dir):
  """make_config(**overrides): see data_testing.small_config."""
  return functools.partial(data_testing.small_config, data_dir)
