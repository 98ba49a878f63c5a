"""The task configs, installed with the package so that they load from any directory.

Each module's `get_config(arg)` builds a config from `base.py`'s plus a small
delta; the module docstrings show the launch commands. From the repository root
`--config=configs/<name>.py` loads the same config through a file that re-exports
the module here (ml_collections loads config files by path).
"""


def load(spec: str, overrides=()):
  """The locked ConfigDict `longjax.main --config=spec --config.<override>...` builds
  (spec: a file, or file:arg), parsed by ml_collections as longjax.main parses it,
  so an unknown field or a value of the wrong type raises."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['longjax', f'--config={spec}'] + [f'--config.{o}' for o in overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'the task config', flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value
