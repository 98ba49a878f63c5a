"""The command line's plumbing, so that `longjax/main.py` stays the flags and `main`.

Config names (`--config=pretrain:local` -> the packaged file), the text of
`--help`, `--print_config`, the platform line, and user errors printed as
clean `FATAL` lines (exit status 1) instead of tracebacks.
"""
from __future__ import annotations

import ipaddress
import os
import sys
from typing import Mapping, Optional

from absl import flags
from absl import logging
import jax

import longjax
from longjax import attention
from longjax.train import run_identity

PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(longjax.__file__)), 'configs')
LOCAL_CONFIGS = 'configs'  # Relative to the current directory (the repository root).
HELP_FLAGS = ('-h', '-?', '--help', '-help', '--helpshort', '-helpshort', '--helpfull',
               '-helpfull')



class UserError(Exception):
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


def resolve_config(value: str) -> str:
  """--config's value with a bare name replaced by its file; UserError if there is none."""
  target, colon, arg = value.partition(':')
  names = config_names()
  known = f'the configs are: {", ".join(names) or "(none found)"}'
  if '/' not in target and not target.endswith('.py'):
    if target not in names:
      raise UserError(f'--config={value}: there is no config named {target!r}; {known} '
                       f'(or pass a path to a config file).')
    return names[target] + colon + arg
  if not os.path.isfile(target):
    raise UserError(f'--config={value}: no such file {target!r} (from {os.getcwd()}); {known}.')
  return value


def with_config_resolved(argv: list[str]) -> list[str]:
  """argv with --config's value made a path (config_flags needs one), before absl parses it."""
  argv = list(argv)
  for index, arg in enumerate(argv[1:], start=1):
    if arg == '--':
      break
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        argv[index] = prefix + resolve_config(arg[len(prefix):])
    if arg in ('--config', '-config') and index + 1 < len(argv):
      argv[index + 1] = resolve_config(argv[index + 1])
  return argv


# --help and --print_config -----------------------------------------------------------


def help_text(modes: dict[str, str], *, full: bool) -> str:
  """--help: the configs, attention kinds, `modes` ({mode: what it does}) and the flags."""
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
      *(f'  {mode:<7} {text}' for mode, text in modes.items()),
      '',
      'Every field and its value: add --print_config, e.g.',
      '  python -m longjax.main --config=tiny --print_config',
      '',
      'Flags:' if full else 'Flags (--helpfull for those of every module):',
      flag_help,
  ]
  return '\n'.join(lines) + '\n'


def print_config(config) -> None:
  try:
    for field, value in run_identity.flatten(config, as_json=False).items():
      print(f'config.{field} = {value!r}')
    sys.stdout.flush()
  except BrokenPipeError:  # `... --print_config | head`: the reader has what it wanted.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# The platform ------------------------------------------------------------------------


def platform_line() -> str:
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


# Multi-process ------------------------------------------------------------------------


def coordinator_bind_address(coordinator_address: Optional[str],
                             environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """What process 0's coordinator listens on: the given address when its host is loopback.

  Left to itself, jax.distributed.initialize binds the coordinator (gRPC, no
  authentication) to every interface, `[::]:PORT`, even for
  `--coordinator_address=localhost:PORT`. A loopback host (localhost,
  127.0.0.0/8, ::1) means every process is on this machine, so the coordinator
  binds to exactly that address. Any other host gets JAX's default: on process 0
  a name can resolve to another address than the one the other hosts reach it by
  (Debian maps its own hostname to 127.0.1.1). None (JAX decides) also when
  JAX_COORDINATOR_BIND_ADDRESS is set (JAX reads it) or no address is given.
  """
  environ = os.environ if environ is None else environ
  if not coordinator_address or environ.get('JAX_COORDINATOR_BIND_ADDRESS'):
    return None
  host, colon, port = coordinator_address.rpartition(':')
  if not colon or not port:
    return None  # Not host:port; JAX says so.
  host = host.strip('[]')
  try:
    loopback = host.lower() == 'localhost' or ipaddress.ip_address(host).is_loopback
  except ValueError:  # A host name.
    loopback = False
  return coordinator_address if loopback else None


# main ---------------------------------------------------------------------------------


def fatal(lines) -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(''.join(f'FATAL {line}\n' if i == 0 else f'{line}\n'
                           for i, line in enumerate(lines)))
  sys.exit(1)


def config_error_lines(error) -> list[str]:
  """A ConfigError as lines: one for a lone problem, else a heading, a line each, the advice."""
  problems = list(getattr(error, 'problems', ()) or [str(error)])
  heading = getattr(error, 'heading', 'Invalid config:')
  advice = getattr(error, 'advice', '')
  if len(problems) == 1 and not advice:
    return [f'{heading} {problems[0]}']
  return [heading] + [f'  {problem}' for problem in problems] + ([advice] if advice else [])


def config_file_problem(error) -> str:
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


def config_arg(argv) -> str:
  """'--config=VALUE' as the user typed it."""
  for index, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg
    if arg in ('--config', '-config') and index + 1 < len(argv):
      return f'--config={argv[index + 1]}'
  return '--config'
