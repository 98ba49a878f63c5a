"""Helpers shared by the trainer tests."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from tests.testing import REPO_ROOT, load_config_module, override, overrides_to_flags  # noqa: F401

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Tiny programs: XLA's CPU backend optimisations cost seconds of compile time
# per program and buy nothing at this size. Every run of a test that is
# compared bitwise with another uses the same flags.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def tiny_config(**overrides):
  """configs/tiny.py with overrides; '__' nests: tiny_config(model__dtype='float32')."""
  return override(load_config_module('tiny').get_config(), **overrides)


def subprocess_env(num_devices=1, cache_dir=None):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + (
      [env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE_FLAGS}'
  env['JAX_PLATFORMS'] = 'cpu'
  if cache_dir:
    # Runs of the same program (resume tests) compile it once.
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return env


def run_python(args, *, env, timeout=300, check=True):
  """Runs `python args...` from the repository root; returns the CompletedProcess."""
  result = subprocess.run([sys.executable] + list(args), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
  if check and result.returncode != 0:
    raise AssertionError(f'{args} exited with {result.returncode}:\n{result.stderr[-6000:]}')
  return result


def run_main(workdir, *, env, check=True, **overrides):
  """`python -m longjax.main --config=configs/tiny.py --workdir=... --config.x=...`."""
  return run_python(['-m', 'longjax.main', '--config=configs/tiny.py', f'--workdir={workdir}']
                    + overrides_to_flags(**overrides), env=env, check=check)


def read_metrics(workdir, split=None):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r['split'] == split]


def restore_state(config, workdir):
  """(step, TrainState as numpy) of the latest checkpoint in workdir, on this process's mesh."""
  from longjax.train import setup  # pylint: disable=g-import-not-at-top
  step, restored = setup.build_run(config, workdir).restore_latest()
  return step, jax.device_get(restored)


def assert_trees_equal(expected, actual):
  """Bitwise equality of every leaf (and the same structure)."""
  assert jax.tree.structure(expected) == jax.tree.structure(actual)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(actual)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))
