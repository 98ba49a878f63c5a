"""Fixtures every test package shares.

In-process tests run tiny programs, for which XLA's CPU optimisation passes
cost seconds of compile time per program and buy nothing (flax's lm1b
train_test turns them off the same way); numerics are unchanged within the
tests' tolerances, and every bitwise comparison runs both sides under the same
setting. Subprocess runs get the same through XLA_FLAGS
(tests/train/train_testing.FAST_COMPILE_FLAGS).
"""
import jax
import pytest

jax.config.update('jax_disable_most_optimizations', True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A tfds data dir for the embedded datasets, built into once per session (tests only read)."""
  return str(tmp_path_factory.mktemp('tfds_data'))


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """A persistent compilation cache shared by the subprocess runs of a session."""
  return tmp_path_factory.mktemp('jax_compile_cache')
