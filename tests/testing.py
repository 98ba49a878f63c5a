"""Helpers every test package shares: the repository's paths, task configs by
name, and config overrides (for fixtures, see tests/conftest.py)."""
import importlib
import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The task configs ship with the package; configs/ at the root only re-exports them.
CONFIGS_DIR = os.path.join(REPO_ROOT, 'longjax', 'configs')


def load_config_module(name_or_path: str):
  """A task config module by name ('tiny') or path. A file of CONFIGS_DIR is imported as its
  longjax.configs module (one copy of it); any other file is loaded by path."""
  name = os.path.splitext(os.path.basename(name_or_path))[0]
  path = os.path.abspath(name_or_path)
  if not name_or_path.endswith('.py') or os.path.dirname(path) == CONFIGS_DIR:
    return importlib.import_module(f'longjax.configs.{name}')
  spec = importlib.util.spec_from_file_location('longjax_test_config_' + name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def override(config, **overrides):
  """Sets fields of an ml-collections config in place; '__' nests:
  override(config, model__attention__kind='local', seq_len=64). Returns config."""
  for key, value in overrides.items():
    *parents, leaf = key.split('__')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def overrides_to_flags(**overrides):
  """The same overrides as --config.x.y=value flags for `python -m longjax.main`."""
  return [f'--config.{key.replace("__", ".")}={value}' for key, value in overrides.items()]
