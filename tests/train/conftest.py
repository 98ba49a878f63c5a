"""Fixtures for the trainer tests.

In-process runs use this process's single CPU device and its XLA flags (the
suite shares the process with other packages' tests, so it changes none).
The mesh, resume, checkpoint and multi-process tests run `python -m
longjax.main` (or a helper script) in subprocesses with their own device
counts, fast-compile flags and a shared compilation cache.
"""
import os
import sys

import pytest

# pytest imports this folder as the package `tests.train`, which does not put
# it on sys.path; the test modules import `train_testing` by plain name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_compile_cache')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A tfds data dir for the embedded datasets, built once per session."""
  return str(tmp_path_factory.mktemp('tfds_data'))
