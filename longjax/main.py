"""Command line: python -m longjax.main --config=pretrain --workdir=DIR [--mode=eval|decode].

`--config` takes a config name (`pretrain`, `pretrain:local`: a file of the
packaged `longjax/configs/` or of `configs/` in the current directory) or a
path (`configs/pretrain.py:local`). Any config field can be overridden as
--config.x.y=value; the config is locked, so a misspelled field is an error.
`--help` lists the configs, attention kinds and modes; `--print_config` shows
every field. A bad config, a bad --workdir or a missing config file prints
FATAL lines naming the flag or field and the fix, and exits 1; bugs keep their
traceback. On Linux the process restarts itself once with transparent huge
pages for large host allocations (longjax/hostmem.py; LONGJAX_HUGEPAGES=0
opts out). Launch commands for a laptop, a GPU node and a Cloud TPU pod slice
are in README.md, "Launching".
"""
import importlib.util
import logging as pylogging
import os
import sys

from longjax import hostmem

if __name__ == '__main__':
  # Before JAX is imported (and its allocator used): restart once with glibc's
  # huge-page tunable; see longjax/hostmem.py. LONGJAX_HUGEPAGES=0 opts out.
  hostmem.reexec_with_hugepages()


class _WithoutTpuProbe(pylogging.Filter):
  """JAX logs "Unable to initialize backend 'tpu'" on every machine without libtpu.

  It reads like an error but only says there is no TPU, which the platform
  line says plainly. Where libtpu is installed the message is a real problem
  (a TPU in use, a broken driver) and stays.
  """

  def filter(self, record):
    return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


if importlib.util.find_spec('libtpu') is None:
  pylogging.getLogger('jax._src.xla_bridge').addFilter(_WithoutTpuProbe())

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import longjax
from longjax import attention
from longjax import data
from longjax.train import evaluation
from longjax.train import run_identity
from longjax.train import setup
from longjax.train import trainer
from longjax.train import validation

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config name (pretrain, pretrain:local) or file (configs/pretrain.py:local); '
    'NAME:ARG passes ARG, an attention kind and/or a size.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and the config go here; resumed from.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'decode'],
                          'train (resumes if the workdir has checkpoints), eval (evaluates '
                          'the latest checkpoint at config.eval_seq_len), or decode (generates '
                          'for the eval split and scores ROUGE / BLEU / exact match).')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print every field of the resolved config (the config, its argument '
    'and the overrides; for eval/decode, the run saved in --workdir) and exit.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Call jax.distributed.initialize()? auto: when a coordinator is given (flags below or '
    'JAX_COORDINATOR_ADDRESS), on Cloud TPU, or under SLURM / Open MPI with > 1 task.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process GPU or CPU runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config'])

MODES = {'train': trainer.train_and_evaluate, 'eval': evaluation.evaluate,
         'decode': evaluation.decode_eval}
MODE_HELP = {
    'train': 'train config.num_train_steps steps (the default); resumes from the workdir',
    'eval': "score the latest checkpoint at config.eval_seq_len, with the run's saved settings",
    'decode': 'generate for the eval split; ROUGE-1/2/L, BLEU, exact match',
}
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(longjax.__file__)), 'configs')
LOCAL_CONFIGS = 'configs'  # Relative to the current directory (the repository root).
_HELP_FLAGS = ('-h', '-?', '--help', '-help', '--helpshort', '-helpshort', '--helpfull',
               '-helpfull')


def _wants_distributed() -> bool:
  if _DISTRIBUTED.value != 'auto':
    return _DISTRIBUTED.value == 'on'
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(value is not None for value in given) or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if importlib.util.find_spec('libtpu') is not None:  # A Cloud TPU VM.
    return True
  tasks = os.environ.get('SLURM_NTASKS') or os.environ.get('OMPI_COMM_WORLD_SIZE') or '1'
  return int(tasks) > 1


class _WithoutOrbaxInfo(pylogging.Filter):
  """Orbax logs dozens of INFO lines per save; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


class _UserError(Exception):
  """A problem in what the user typed: printed as FATAL lines, exit status 1."""


# Configs by name ---------------------------------------------------------------------


def config_names() -> dict[str, str]:
  """{name: file} of every config `--config=NAME` finds, the packaged ones first."""
  found = {}
  for folder in (PACKAGED_CONFIGS, LOCAL_CONFIGS):
    if not os.path.isdir(folder):
      continue
    for entry in sorted(os.listdir(folder)):
      name, ext = os.path.splitext(entry)
      path = os.path.join(folder, entry)
      if ext == '.py' and not name.startswith('_') and name not in found and _is_config(path):
        found[name] = path
  return found


def _is_config(path: str) -> bool:
  with open(path, encoding='utf-8') as f:
    return 'get_config' in f.read()  # Defines it, or re-exports a packaged one.


def _resolve_config(value: str) -> str:
  """--config's value with a bare name replaced by its file; _UserError if there is none."""
  target, colon, arg = value.partition(':')
  names = config_names()
  known = f'the configs are: {", ".join(names) or "(none found)"}'
  if '/' not in target and not target.endswith('.py'):
    if target not in names:
      raise _UserError(f'--config={value}: there is no config named {target!r}; {known} '
                       f'(or pass a path to a config file).')
    return names[target] + colon + arg
  if not os.path.isfile(target):
    raise _UserError(f'--config={value}: no such file {target!r} (from {os.getcwd()}); {known}.')
  return value


def _with_config_resolved(argv: list[str]) -> list[str]:
  """argv with --config's value made a path (config_flags needs one), before absl parses it."""
  argv = list(argv)
  for index, arg in enumerate(argv[1:], start=1):
    if arg == '--':
      break
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        argv[index] = prefix + _resolve_config(arg[len(prefix):])
    if arg in ('--config', '-config') and index + 1 < len(argv):
      argv[index + 1] = _resolve_config(argv[index + 1])
  return argv


# --help and --print_config -----------------------------------------------------------


def _help_text(full: bool) -> str:
  names = config_names()
  folders = ' and '.join(f'{os.path.relpath(folder)}/' for folder in
                         (PACKAGED_CONFIGS, LOCAL_CONFIGS) if os.path.isdir(folder))
  flag_help = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
  lines = [
      'Train, evaluate or decode a long-context model.',
      '',
      '  python -m longjax.main --config=CONFIG --workdir=DIR [--mode=MODE] '
      '[--config.FIELD=VALUE ...]',
      '',
      f'Configs (--config=NAME, NAME:ARG, or a file such as configs/NAME.py:ARG; from '
      f'{folders or "nowhere: run from the repository root"}):',
      f'  {", ".join(names) or "(none found)"}',
      '  ARG is an attention kind and/or a size, e.g. pretrain:local or passkey:local,tiny.',
      '',
      'Attention kinds (--config.model.attention.kind=KIND, or NAME:KIND):',
      f'  {", ".join(attention.KINDS)}',
      '',
      'Modes (--mode=MODE):',
      *(f'  {mode:<7} {text}' for mode, text in MODE_HELP.items()),
      '',
      'Every field and its value: add --print_config, e.g.',
      '  python -m longjax.main --config=tiny --print_config',
      '',
      'Flags:' if full else 'Flags (--helpfull for those of every module):',
      flag_help,
  ]
  return '\n'.join(lines) + '\n'


def _print_config(config) -> None:
  try:
    for field, value in run_identity.flatten(config, as_json=False).items():
      print(f'config.{field} = {value!r}')
    sys.stdout.flush()
  except BrokenPipeError:  # `... --print_config | head`: the reader has what it wanted.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# The platform ------------------------------------------------------------------------


def _platform_line() -> str:
  """'Running on 1 CPU device (no GPU or TPU found).' and the like."""
  devices = jax.devices()
  platform = devices[0].platform
  word = {'cpu': 'CPU', 'gpu': 'GPU', 'cuda': 'GPU', 'rocm': 'GPU', 'tpu': 'TPU'}.get(
      platform, platform.upper())
  text = f'Running on {len(devices)} {word} device{"" if len(devices) == 1 else "s"}'
  if jax.process_count() > 1:
    text += f' in {jax.process_count()} processes ({jax.local_device_count()} in this one)'
  if platform == 'cpu':
    chosen = os.environ.get('JAX_PLATFORMS')
    text += f' (JAX_PLATFORMS={chosen})' if chosen else ' (no GPU or TPU found)'
  return text + '.'


# main ---------------------------------------------------------------------------------


def _fatal(lines) -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(''.join(f'FATAL {line}\n' if i == 0 else f'{line}\n'
                           for i, line in enumerate(lines)))
  sys.exit(1)


def _config_error_lines(error) -> list[str]:
  """A ConfigError as lines: one for a lone problem, else a heading, a line each, the advice."""
  problems = list(getattr(error, 'problems', ()) or [str(error)])
  heading = getattr(error, 'heading', 'Invalid config:')
  advice = getattr(error, 'advice', '')
  if len(problems) == 1 and not advice:
    return [f'{heading} {problems[0]}']
  return [heading] + [f'  {problem}' for problem in problems] + ([advice] if advice else [])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_WithoutOrbaxInfo())
  mode, workdir = _MODE.value, _WORKDIR.value
  try:
    if workdir is None and not (_PRINT_CONFIG.value and mode == 'train'):
      raise _UserError('--workdir is required: the directory for checkpoints, metrics and '
                       'config.json (created if missing), e.g. --workdir=/tmp/run.')
    if _PRINT_CONFIG.value:
      config = _CONFIG.value
      if mode != 'train':
        config = run_identity.evaluation_config(config, workdir, mode=mode)
      _print_config(config)
      return
    problem = setup.workdir_problem(workdir, create=mode == 'train')
    if problem:
      raise _UserError(f'--workdir={workdir} {problem}')
    if _wants_distributed():
      # Must come before anything touches a device; missing values are found
      # from the cluster environment (Cloud TPU metadata, SLURM, Open MPI).
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value,
                                 process_id=_PROCESS_ID.value)
    logging.info(_platform_line())
    if jax.process_count() > 1:
      logging.info('JAX process %d of %d, %d local devices.', jax.process_index(),
                   jax.process_count(), jax.local_device_count())
    logging.info('Large host allocations on transparent huge pages: %s.',
                 'yes' if hostmem.is_on(os.environ) else 'no')
    MODES[mode](_CONFIG.value, workdir)
  except _UserError as error:
    _fatal([str(error)])
  except (validation.ConfigError, data.DataConfigError) as error:
    _fatal(_config_error_lines(error))
  except run_identity.NotTrainedError as error:
    _fatal([str(error)])


def _parse_flags(argv):
  """absl's parser, with --help exiting 0 and every user error as clean FATAL lines."""
  rest = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  help_flags = [arg for arg in rest if arg.split('=')[0] in _HELP_FLAGS]
  if help_flags:
    sys.stdout.write(_help_text(full=any('full' in arg for arg in help_flags)))
    sys.exit(0)
  given = argv
  try:
    argv = _with_config_resolved(argv)
    return flags.FLAGS(argv)
  except _UserError as error:
    _fatal([str(error)])
  except flags.Error as error:
    problem = _config_file_problem(error)
    if problem:
      _fatal([f'{_config_arg(given)}: {problem}'])
    _fatal([f'Flags parsing error: {error}',
            'Pass --help to see the configs, attention kinds, modes and flags.'])
  except (AttributeError, KeyError) as error:
    # config_flags raises these for an override of a field the config lacks;
    # their message names the field and suggests the nearest one.
    overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]  # AttributeError(KeyError(message)).
    message = str(error.args[0] if error.args else error).replace('\n', ' ')
    _fatal([f'Flags parsing error: unknown config field among {", ".join(overrides)}: '
            f'{message}'])


def _config_file_problem(error) -> str:
  """The config file's own ValueError (e.g. an unknown :ARG) under config_flags' wrapping.

  config_flags re-raises a ValueError of get_config() as a ValueError holding
  the whole traceback; the first one in the chain is the user's mistake.
  TypeErrors and the rest are left alone: they point at a bug in the file.
  """
  if not str(error).startswith('flag --config='):
    return ''  # Another flag, such as --config.batch_size=abc: absl's message is clear.
  cause = error.__cause__ or error.__context__
  while cause is not None:
    if isinstance(cause, ValueError) and 'Error whilst parsing config file' not in str(cause):
      return str(cause)
    cause = cause.__cause__ or cause.__context__
  return ''


def _config_arg(argv) -> str:
  """'--config=VALUE' as the user typed it."""
  for index, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg
    if arg in ('--config', '-config') and index + 1 < len(argv):
      return f'--config={argv[index + 1]}'
  return '--config'


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
