"""Sequence-length sweeps: one run per (attention kind, length, learning rate, seed).

    python -m experiments.sweep --config=configs/passkey.py \
        --lengths=32,64,128,256 --kinds=full,local,global_local [--seeds=0,1,2] \
        --workdir=/tmp/passkey_sweep [--set num_train_steps=300 ...] [--print_only]
    python -m experiments.sweep --config=configs/pretrain.py --lengths=256,1024,4096 \
        --kinds=local,global_local,transient_global --sequences_per_step=16 \
        --micro_tokens=16384 --match=keys --budget=256 --learning_rates=1e-3,3e-3,1e-2 \
        --workdir=/tmp/pretrain_sweep
    python -m experiments.sweep --suite=ruler [--tasks=niah_single,variable_tracking] \
        --lengths=128,256 --kinds=full,local --workdir=/tmp/ruler

What a fair comparison holds fixed (experiments/budget.py; every choice goes
into `<workdir>/sweep.json` and a `protocol:` line):
  * documents per step: `--sequences_per_step=N` trains every length on N
    sequences per optimizer step (grad_accum_steps per length keeps each
    micro-batch under `--micro_tokens`); `--tokens_per_batch=T` holds tokens per
    step instead and refuses a length with fewer than `--min_sequences` (16)
    sequences per step. Neither: the config's batch_size at every length.
  * the attention budget: `--match=keys --budget=K` sets each kind's budget
    parameter (local's radius, chunked's chunk_size, adaptive_span's max_span,
    global_local's and transient_global's radius beside their globals and
    summaries, hierarchical's level0_block) so that it attends at most K keys
    per query; `--match=flops` so that its attention layer costs at most the
    FLOPs per token of full attention over K keys. `full` is left as it is.
  * seeds: three by default (mean +- std in compare); `--learning_rates` adds a
    learning-rate dimension, each run in `<kind>/L<length>_lr<lr>_s<seed>`, and
    compare keeps each (kind, length)'s best.
  * the stopping criterion: compare marks whether each run's eval loss had
    flattened (budget.CRITERION) — raise num_train_steps for the runs that had not.

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
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Iterable, Mapping, Optional, Sequence

from absl import app, flags

from experiments import budget, compare
from experiments.checks import (BadArgument, _one_line, check_config, check_kinds, parse_ints,
                                plain_override)

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'Task config file, e.g. configs/passkey.py.')
flags.DEFINE_list('lengths', None, 'Sequence lengths (config.seq_len).')
flags.DEFINE_list('kinds', None, 'Attention kinds (the config argument).')
flags.DEFINE_list('seeds', ['0', '1', '2'],
                  'Seeds (config.seed); three by default, so tables report mean +- std.')
flags.DEFINE_list('learning_rates', None,
                  'Peak learning rates (config.learning_rate) to sweep, e.g. 1e-3,3e-3,1e-2; '
                  'experiments.compare keeps the best per kind and length (default: the '
                  'config\'s).')
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
                     'length trains on the same tokens per step (0: the config\'s batch_size); '
                     'a length with fewer than --min_sequences sequences per step is refused.')
flags.DEFINE_integer('min_sequences', 16, 'With --tokens_per_batch: the fewest sequences per '
                     'step any length may get.')
flags.DEFINE_integer('sequences_per_step', 0,
                     'If set, batch_size at every length (documents per step fixed), with '
                     'grad_accum_steps chosen per length by --micro_tokens.')
flags.DEFINE_integer('micro_tokens', 0, 'With --sequences_per_step: the most tokens of one '
                     'micro-batch (0: no gradient accumulation).')
flags.DEFINE_enum('match', '', ['', 'keys', 'flops'],
                  'Budget-match the kinds (experiments/budget.py): keys = each kind\'s keys '
                  'per query <= --budget; flops = its attention layer\'s FLOPs per token <= '
                  'full attention over --budget keys.')
flags.DEFINE_integer('budget', 0, 'With --match: the budget, in keys per query.')


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


@dataclasses.dataclass(frozen=True)
class Run:
  kind: str
  length: int
  seed: int
  workdir: str
  task: str = ''  # a suite's task ('' for a one-config sweep)
  learning_rate: Optional[float] = None  # None: the config's
  settings: tuple[str, ...] = ()  # this run's own 'field=value' (batch shape, matched budget)

  @property
  def name(self) -> str:
    lr = '' if self.learning_rate is None else f' lr={self.learning_rate:g}'
    return ' '.join(filter(None, [self.task,
                                  f'{self.kind} L={self.length}{lr} seed={self.seed}']))

  def command(self, config: str, size: str = '', overrides: Sequence[str] = ()) -> list[str]:
    """config: a file, or file:word for a config that takes a word (a suite's task)."""
    path, _, word = config.partition(':')
    arg = ','.join(filter(None, [word, self.kind, size]))
    cmd = [sys.executable, '-m', 'longjax.main', f'--config={path}:{arg}',
           f'--workdir={self.workdir}', f'--config.seq_len={self.length}',
           f'--config.seed={self.seed}']
    if self.learning_rate is not None:
      cmd.append(f'--config.learning_rate={self.learning_rate:g}')
    return cmd + [f'--config.{o}' for o in (*self.settings, *overrides)]


def plan(workdir: str, kinds: Iterable[str], lengths: Iterable[int],
         seeds: Iterable[int], task: str = '', learning_rates: Sequence[float] = (),
         settings: Optional[Mapping] = None) -> list[Run]:
  """One run per kind, length, learning rate and seed; settings: {(kind, length):
  ['field=value', ...]} (budget.protocol's overrides)."""
  settings = settings or {}
  return [Run(kind, int(length), int(seed), os.path.join(workdir, kind, _run_dir(length, lr, seed)),
              task, lr, tuple(settings.get((kind, length), ())))
          for kind in kinds for length in lengths for lr in (learning_rates or [None])
          for seed in seeds]


def _run_dir(length: int, learning_rate: Optional[float], seed: int) -> str:
  lr = '' if learning_rate is None else f'_lr{learning_rate:g}'
  return f'L{length}{lr}_s{seed}'


def parse_learning_rates(values: Optional[Sequence[str]]) -> list[float]:
  rates = []
  for value in values or ():
    try:
      rate = float(value)
    except ValueError:
      rate = 0.0
    if not rate > 0:
      raise BadArgument(f'--learning_rates: {value!r} is not a positive number; give it like '
                        '--learning_rates=1e-3,3e-3,1e-2.')
    rates.append(rate)
  return rates


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


def write_protocol(workdir: str, header: Mapping) -> str:
  """<workdir>/sweep.json: what the sweep held fixed (per task for a suite)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'sweep.json')
  body = header[''] if list(header) == [''] else dict(header)
  with open(path, 'w') as f:
    json.dump(_json_keys(body), f, indent=2)
  return path


def _json_keys(value):
  if isinstance(value, Mapping):
    return {str(k): _json_keys(v) for k, v in value.items()}
  return value


def main(argv: Sequence[str]) -> int:
  """The sweep (FLAGS already parsed); returns the exit status: 0 when every run
  finished (or with --print_only), 1 when a run failed, 2 for a bad argument
  (then nothing was launched)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    lengths = parse_ints('lengths', FLAGS.lengths, minimum=1, example='--lengths=32,64,128')
    seeds = parse_ints('seeds', FLAGS.seeds, minimum=0, example='--seeds=0,1,2')
    learning_rates = parse_learning_rates(FLAGS.learning_rates)
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
    loaded = {task: check_config(c, FLAGS.kinds, FLAGS.size, overrides)
              for task, c in task_configs.items()}
    try:
      protocols = {task: budget.protocol(
          configs, lengths, overrides=overrides, tokens_per_batch=FLAGS.tokens_per_batch,
          min_sequences=FLAGS.min_sequences, sequences_per_step=FLAGS.sequences_per_step,
          micro_tokens=FLAGS.micro_tokens, match=FLAGS.match, budget=FLAGS.budget)
                   for task, configs in loaded.items()}
    except budget.BudgetError as error:
      raise BadArgument(str(error)) from None
    # The model must accept the longest length of the sweep.
    longest = max(lengths)
    max_len = min(c.model.max_len for configs in loaded.values() for c in configs.values())
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
    for run in plan(os.path.join(FLAGS.workdir, task), FLAGS.kinds, lengths, seeds, task,
                    learning_rates, protocols[task].overrides):
      runs.append(run)
      commands.append(run.command(config, FLAGS.size, overrides))
  header = {task: dict(protocols[task].description, seeds=seeds,
                       learning_rates=learning_rates or 'the config\'s') for task in task_configs}
  for task, description in header.items():
    print(f'protocol{" of " + task if task else ""}: {description["documents_per_step"]}; '
          f'attention budget: {description["match"]}; seeds {seeds}', file=sys.stderr)
  if FLAGS.print_only:
    print('\n'.join(shlex.join(cmd) for cmd in commands))
    return 0
  write_protocol(FLAGS.workdir, header)
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
