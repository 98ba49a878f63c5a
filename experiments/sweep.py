"""Sequence-length sweeps: one run per (attention kind, length, seed).

    python -m experiments.sweep --config=configs/passkey.py \
        --lengths=32,64,128,256 --kinds=full,local,global_local --seeds=0,1 \
        --workdir=/tmp/passkey_sweep [--set num_train_steps=300 ...] [--print_only]
        [--tokens_per_batch=8192]
    python -m experiments.sweep --suite=ruler [--tasks=niah_single,variable_tracking] \
        --lengths=128,256 --kinds=full,local --seeds=0,1,2 --workdir=/tmp/ruler

`--suite=ruler` runs the RULER-style tasks (configs/ruler.py:<task>) and the
passkey and associative_recall configs, each task's runs under
`<workdir>/<task>/`; `experiments.compare` then draws each task's curves.

Each run gets its own workdir `<workdir>/<kind>/L<length>_s<seed>` and is an
ordinary `python -m longjax.main` process, so a run can be resumed, inspected
or compared on its own; its output goes to `sweep.log` in that workdir.

Before anything is launched the kinds (longjax.attention.KINDS), lengths,
seeds and every `--set field=value` (a field of the loaded config, a value of
its type) are checked; a bad one is a one-line `error:` and exit status 2.
Finished runs (metrics.jsonl reached the config's last step) are skipped;
unfinished ones are relaunched and resume from their latest checkpoint. A line
per run says how it ended (final eval metrics, wall time); at the end a table
lists the failed runs with their exit code, the last lines of their output and
their log, and the sweep exits 1 if any run failed. `--print_only` writes the
commands (one per line) for a cluster scheduler instead of running them here.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Iterable, Sequence

from absl import app, flags

from experiments import compare

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'Task config file, e.g. configs/passkey.py.')
flags.DEFINE_list('lengths', None, 'Sequence lengths (config.seq_len).')
flags.DEFINE_list('kinds', None, 'Attention kinds (the config argument).')
flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed).')
flags.DEFINE_string('workdir', None, 'Root directory of the sweep.')
flags.DEFINE_multi_string('set', [], 'Extra overrides for every run, as field=value '
                          '(what longjax.main takes as --config.field=value).')
flags.DEFINE_string('size', '', 'Config size word passed with the kind (e.g. tiny).')
flags.DEFINE_bool('print_only', False, 'Print the commands instead of running them.')
flags.DEFINE_enum('suite', '', ['', 'ruler'],
                  'Run a suite of tasks instead of one --config: ruler = the RULER-style '
                  'tasks (configs/ruler.py:<task>) plus passkey and associative_recall; each '
                  'task\'s runs go under <workdir>/<task>/.')
flags.DEFINE_list('tasks', None, 'With --suite: the tasks to run (default: all of the suite).')
flags.DEFINE_integer('tokens_per_batch', 0,
                     'If set, batch_size = tokens_per_batch // length for each run, so every '
                     'length trains on the same tokens per step (0: the config\'s batch_size).')


def suite_configs(suite: str) -> dict[str, str]:
  """task -> the config spec a suite runs it with ('file.py' or 'file.py:task')."""
  from longjax.data.config import RULER_TASKS  # pylint: disable=g-import-not-at-top
  if suite != 'ruler':
    raise BadArgument(f'--suite={suite}: unknown; the suites are: ruler.')
  configs = {task: f'configs/ruler.py:{task}' for task in RULER_TASKS}
  configs.update(passkey='configs/passkey.py', associative_recall='configs/associative_recall.py')
  return configs


USAGE_ERROR = 2  # Exit status for a bad argument: nothing was launched.
TAIL_LINES = 3  # Lines of a failed run's output shown in the failure table.


class BadArgument(ValueError):
  """A sweep argument that would make runs fail; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  kind: str
  length: int
  seed: int
  workdir: str
  task: str = ''  # a suite's task ('' for a one-config sweep)

  @property
  def name(self) -> str:
    return ' '.join(filter(None, [self.task, f'{self.kind} L={self.length} seed={self.seed}']))

  def command(self, config: str, size: str = '', overrides: Sequence[str] = (),
              tokens_per_batch: int = 0) -> list[str]:
    """config: a file, or file:word for a config that takes a word (a suite's task)."""
    path, _, word = config.partition(':')
    arg = ','.join(filter(None, [word, self.kind, size]))
    cmd = [sys.executable, '-m', 'longjax.main', f'--config={path}:{arg}',
           f'--workdir={self.workdir}', f'--config.seq_len={self.length}',
           f'--config.seed={self.seed}']
    if tokens_per_batch:
      cmd.append(f'--config.batch_size={batch_for(tokens_per_batch, self.length)}')
    return cmd + [f'--config.{o}' for o in overrides]


def batch_for(tokens_per_batch: int, length: int) -> int:
  """The global batch that holds `tokens_per_batch` tokens of `length` each."""
  if tokens_per_batch % length:
    raise ValueError(f'--tokens_per_batch={tokens_per_batch} is not a multiple of length '
                     f'{length}: choose lengths that divide it, so every run sees the same '
                     'tokens per step.')
  return tokens_per_batch // length


def plan(workdir: str, kinds: Iterable[str], lengths: Iterable[int],
         seeds: Iterable[int], task: str = '') -> list[Run]:
  return [Run(kind, int(length), int(seed),
              os.path.join(workdir, kind, f'L{length}_s{seed}'), task)
          for kind in kinds for length in lengths for seed in seeds]


def is_finished(run_workdir: str) -> bool:
  """True when metrics.jsonl holds a record at the saved config's last step."""
  config_path = os.path.join(run_workdir, 'config.json')
  metrics_path = os.path.join(run_workdir, 'metrics.jsonl')
  if not (os.path.exists(config_path) and os.path.exists(metrics_path)):
    return False
  with open(config_path) as f:
    last = json.load(f)['num_train_steps']
  with open(metrics_path) as f:
    steps = [json.loads(line).get('step', -1) for line in f if line.strip()]
  return bool(steps) and max(steps) >= last


# Checks before launching ------------------------------------------------------


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
  """The ConfigDict longjax.main would build from --config=config:arg --config.<override>...

  Parsed by ml_collections exactly as longjax.main parses it (locked, so an
  unknown field or a value of the wrong type raises).
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['sweep', f'--config={config}:{arg}' if arg else f'--config={config}']
  argv += [f'--config.{o}' for o in overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'the task config',
                                           flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  flag_values(argv)
  return holder.value


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
                 overrides: Sequence[str]):
  """Loads the config of every kind with the overrides; returns the first kind's.

  config: a file, or file:word (a suite's task word, put before the kind).
  """
  config, _, word = config.partition(':')
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
  configs = []
  for kind in kinds:  # Every run's exact config, all overrides together.
    arg = ','.join(filter(None, [kind, size]))
    try:
      configs.append(load_config(config, arg, overrides))
    except Exception as error:  # pylint: disable=broad-except
      given = ''.join(f' --set {o}' for o in overrides)
      raise BadArgument(f'--config={config}:{arg}{given}: {_one_line(error)}') from None
  return configs[0]


def _one_line(error: BaseException) -> str:
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps errors: AttributeError(KeyError(...)).
  message = str(error.args[0]) if len(error.args) == 1 else str(error)
  if 'Traceback (most recent call last)' in message:
    # ml_collections quotes the config file's traceback: its last line is the error.
    message = [line for line in message.splitlines() if line.strip()][-1]
  return ' '.join(message.split())


# Running ------------------------------------------------------------------------


def launch(cmd: Sequence[str], log_path: str) -> int:
  """Runs one longjax.main to the end, its output appended to log_path; its exit status."""
  with open(log_path, 'a') as log:
    return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def final_metrics(workdir: str) -> str:
  """'step 600 | eval loss 1.0590 | accuracy 0.8234' from a run's metrics.jsonl."""
  try:
    run = compare.load_run(workdir)
    evaluation = run.latest('eval')
  except (OSError, ValueError, KeyError) as error:
    return f'no metrics ({_one_line(error)})'
  if not evaluation:
    return f'no eval record at L={run.length} in metrics.jsonl'
  shown = [f'{name} {evaluation[name]:.4f}' for name in
           ('loss', 'accuracy', 'exact_match', 'bits_per_byte')
           if isinstance(evaluation.get(name), (int, float))]
  return f'step {evaluation.get("step")} | eval ' + ' | '.join(shown)


def _seconds(seconds: float) -> str:
  return f'{seconds:.1f} s' if seconds < 60 else f'{int(seconds // 60)} min {seconds % 60:02.0f} s'


def _exit_status(code: int) -> str:
  if code < 0:
    return f'killed by signal {-code}'
  if code == 143:  # longjax.main after a preemption notice: the checkpoint is saved.
    return 'exit code 143 (preempted; rerun the sweep to resume)'
  return f'exit code {code}'


def _tail(log_path: str, offset: int) -> list[str]:
  """The last lines this attempt wrote to the log (the log is appended to)."""
  try:
    with open(log_path, errors='replace') as f:
      f.seek(offset)
      lines = [line.rstrip() for line in f if line.strip()]
  except OSError:
    return []
  return lines[-TAIL_LINES:]


@dataclasses.dataclass
class Failure:
  run: Run
  code: int
  log_path: str
  tail: list[str]


def failure_table(failures: Sequence[Failure], total: int) -> str:
  width = max(len(f.run.name) for f in failures)
  lines = [f'{len(failures)} of {total} runs failed:',
           f'  {"run":<{width}}  {"exit status":<12} log']
  for failure in failures:
    lines.append(f'  {failure.run.name:<{width}}  {_exit_status(failure.code):<12} '
                 f'{failure.log_path}')
    lines += [f'      | {line}' for line in failure.tail]
  return '\n'.join(lines)


def run_all(runs: Sequence[Run], commands: Sequence[list[str]]) -> list[Failure]:
  failures = []
  for i, (run, cmd) in enumerate(zip(runs, commands), 1):
    tag = f'[{i}/{len(runs)}] {run.name}'
    if is_finished(run.workdir):
      print(f'{tag}: done already | {final_metrics(run.workdir)} | {run.workdir}', flush=True)
      continue
    os.makedirs(run.workdir, exist_ok=True)
    log_path = os.path.join(run.workdir, 'sweep.log')
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    print(f'{tag}: running {shlex.join(cmd)}', flush=True)
    start = time.monotonic()
    code = launch(cmd, log_path)
    took = _seconds(time.monotonic() - start)
    if code:
      failures.append(Failure(run, code, log_path, _tail(log_path, offset)))
      print(f'{tag}: FAILED, {_exit_status(code)}, after {took} | log {log_path}', flush=True)
    else:
      print(f'{tag}: finished in {took} | {final_metrics(run.workdir)}', flush=True)
  return failures


def main(argv: Sequence[str]) -> int:
  """The sweep (FLAGS already parsed); returns the exit status: 0 when every run
  finished (or with --print_only), 1 when a run failed, 2 for a bad argument
  (then nothing was launched)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    lengths = parse_ints('lengths', FLAGS.lengths, minimum=1, example='--lengths=32,64,128')
    seeds = parse_ints('seeds', FLAGS.seeds, minimum=0, example='--seeds=0,1,2')
    for length in lengths if FLAGS.tokens_per_batch else ():
      try:
        batch_for(FLAGS.tokens_per_batch, length)
      except ValueError as error:
        raise BadArgument(str(error)) from None
    check_kinds(FLAGS.kinds)
    overrides = [plain_override(o) for o in FLAGS.set]
    if bool(FLAGS.suite) == bool(FLAGS.config):
      raise BadArgument('give --config (one task) or --suite (a suite of tasks), not both '
                        'and not neither.')
    if FLAGS.suite:
      tasks = suite_configs(FLAGS.suite)
      chosen = FLAGS.tasks or list(tasks)
      unknown = [t for t in chosen if t not in tasks]
      if unknown:
        raise BadArgument(f'--tasks: {", ".join(unknown)} not in --suite={FLAGS.suite} '
                          f'({", ".join(tasks)}).')
      task_configs = {t: tasks[t] for t in chosen}
    else:
      task_configs = {'': FLAGS.config}
    loaded = [check_config(c, FLAGS.kinds, FLAGS.size, overrides)
              for c in task_configs.values()]
    # The model must accept the longest length of the sweep.
    longest, max_len = max(lengths), min(c.model.max_len for c in loaded)
    max_len_set = any(o.startswith('model.max_len=') for o in overrides)
    if longest > max_len and max_len_set:
      raise BadArgument(f'--set model.max_len={max_len} is shorter than the longest of '
                        f'--lengths ({longest}); raise it, or drop it and the sweep sets it.')
  except BadArgument as error:
    print(f'error: {error}', file=sys.stderr)
    return USAGE_ERROR
  if longest > max_len:
    overrides.append(f'model.max_len={longest}')
    print(f'note: model.max_len raised from {max_len} to {longest} (the longest length) in '
          'every run.', file=sys.stderr)
  runs, commands = [], []
  for task, config in task_configs.items():
    for run in plan(os.path.join(FLAGS.workdir, task), FLAGS.kinds, lengths, seeds, task):
      runs.append(run)
      commands.append(run.command(config, FLAGS.size, overrides, FLAGS.tokens_per_batch))
  if FLAGS.print_only:
    print('\n'.join(shlex.join(cmd) for cmd in commands))
    return 0
  failures = run_all(runs, commands)
  if failures:
    print(failure_table(failures, len(runs)), flush=True)
    return 1
  print(f'{len(runs)} of {len(runs)} runs finished; compare them with: '
        f'python -m experiments.compare {FLAGS.workdir} --out=<report dir>', flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['lengths', 'kinds', 'workdir'])
  app.run(main)
