"""The sweep's checks before anything is launched: every argument, and every run's config.

A bad argument is a `BadArgument` whose message names the flag and the fix; the
sweep prints it as one `error:` line and exits 2, having launched nothing.
"""
from __future__ import annotations

import difflib
import glob
import os
from typing import Sequence



class BadArgument(ValueError):
  """A sweep argument that would make runs fail; the message names it and the fix."""


def parse_ints(flag: str, values: Sequence[str], *, minimum: int, example: str) -> list[int]:
  what = 'a positive integer' if minimum == 1 else 'a non-negative integer'
  if not values:
    raise BadArgument(f'--{flag} is empty; give it like {example}.')
  out = []
  for value in values:
    try:
      number = int(value)
    except ValueError:
      number = None
    if number is None or number < minimum:
      raise BadArgument(f'--{flag}: {value!r} is not {what}; give it like {example}.')
    out.append(number)
  return out


def check_kinds(kinds: Sequence[str]) -> None:
  from longjax import attention  # pylint: disable=g-import-not-at-top  (imports JAX)
  if not kinds:
    raise BadArgument(f'--kinds is empty; valid kinds are: {", ".join(attention.KINDS)}.')
  for kind in kinds:
    if kind not in attention.KINDS:
      raise BadArgument(f'--kinds: unknown attention kind {kind!r}; valid kinds are: '
                        f'{", ".join(attention.KINDS)}.')


def plain_override(override: str) -> str:
  """'--config.model.dtype=float32' (as longjax.main takes it) -> 'model.dtype=float32'."""
  override = override.strip()
  for prefix in ('--config.', 'config.'):
    if override.startswith(prefix):
      override = override[len(prefix):]
  return override


def load_config(config: str, arg: str, overrides: Sequence[str] = ()):
  """The ConfigDict longjax.main would build from --config=config:arg --config.<override>..."""
  from longjax import configs  # pylint: disable=g-import-not-at-top
  return configs.load(f'{config}:{arg}' if arg else config, overrides)


def _unknown_field(config, field: str) -> str:
  """Which part of a dotted field the config lacks, the nearest name and the valid ones."""
  node, where = config, 'config'
  for part in field.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      if not keys:
        return f'{where} is a value, not a group of fields'
      near = (difflib.get_close_matches(part, keys, n=1) or
              difflib.get_close_matches(field, _dotted_fields(config), n=1))
      hint = f' (did you mean {near[0]!r}?)' if near else ''
      return f'{where} has no field {part!r}{hint}; its fields are: {", ".join(sorted(keys))}'
    node, where = node[part], f'{where}.{part}'
  return ''


def _dotted_fields(node, prefix: str = '') -> list[str]:
  """Every field of a config as a dotted name: 'seed', 'model', 'model.attention.kind'..."""
  names = []
  for key in node.keys() if hasattr(node, 'keys') else ():
    names.append(prefix + key)
    names += _dotted_fields(node[key], f'{prefix}{key}.')
  return names


def check_config(config: str, kinds: Sequence[str], size: str,
                 overrides: Sequence[str]) -> dict:
  """Loads the config of every kind with the overrides; returns {kind: its config}.

  config: a file, or file:word (a suite's task word, put before the kind).
  """
  config, _, word = config.partition(':')
  names = list(kinds)
  if word:
    kinds = [','.join(filter(None, [word, kind])) for kind in kinds]
  if not os.path.exists(config):
    found = sorted(glob.glob(os.path.join(os.path.dirname(config) or '.', '*.py')))
    raise BadArgument(f'--config={config}: no such file (from {os.getcwd()}); config files '
                      f'there: {", ".join(found) or "none"}.')
  first_arg = ','.join(filter(None, [kinds[0], size]))
  try:
    loaded = load_config(config, first_arg)
  except Exception as error:  # pylint: disable=broad-except  (any failure of the user's file)
    raise BadArgument(f'--config={config}:{first_arg}: {_one_line(error)}') from None
  for override in overrides:
    if '=' not in override:
      raise BadArgument(f'--set {override}: write field=value, e.g. --set num_train_steps=300.')
    field = override.split('=', 1)[0]
    unknown = _unknown_field(loaded, field)
    if unknown:
      raise BadArgument(f'--set {override}: {unknown}.')
    try:
      load_config(config, first_arg, [override])
    except Exception as error:  # pylint: disable=broad-except
      raise BadArgument(f'--set {override}: {_one_line(error)}') from None
  configs = {}
  for name, kind in zip(names, kinds):  # Every run's exact config, all overrides together.
    arg = ','.join(filter(None, [kind, size]))
    try:
      configs[name] = load_config(config, arg, overrides)
    except Exception as error:  # pylint: disable=broad-except
      given = ''.join(f' --set {o}' for o in overrides)
      raise BadArgument(f'--config={config}:{arg}{given}: {_one_line(error)}') from None
  return configs


def _one_line(error: BaseException) -> str:
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps errors: AttributeError(KeyError(...)).
  message = str(error.args[0]) if len(error.args) == 1 else str(error)
  if 'Traceback (most recent call last)' in message:
    # ml_collections quotes the config file's traceback: its last line is the error.
    message = [line for line in message.splitlines() if line.strip()][-1]
  return ' '.join(message.split())
