"""Sequence-length sweeps: one run per (attention kind, length, seed).

    python -m experiments.sweep --config=configs/passkey.py \
        --lengths=32,64,128,256 --kinds=full,local,global_local --seeds=0,1 \
        --workdir=/tmp/passkey_sweep [--set num_train_steps=300 ...] [--print_only]
        [--tokens_per_batch=8192]

Each run gets its own workdir `<workdir>/<kind>/L<length>_s<seed>` and is an
ordinary `python -m longjax.main` process, so a run can be resumed, inspected
or compared on its own. Finished runs (metrics.jsonl reached the config's
last step) are skipped; unfinished ones are relaunched and resume from their
latest checkpoint. `--print_only` writes the commands (one per line) for a
cluster scheduler instead of running them here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from typing import Iterable, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'Task config file, e.g. configs/passkey.py.')
flags.DEFINE_list('lengths', None, 'Sequence lengths (config.seq_len).')
flags.DEFINE_list('kinds', None, 'Attention kinds (the config argument).')
flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed).')
flags.DEFINE_string('workdir', None, 'Root directory of the sweep.')
flags.DEFINE_multi_string('set', [], 'Extra overrides for every run, as field=value.')
flags.DEFINE_string('size', '', 'Config size word passed with the kind (e.g. tiny).')
flags.DEFINE_bool('print_only', False, 'Print the commands instead of running them.')
flags.DEFINE_integer('tokens_per_batch', 0,
                     'If set, batch_size = tokens_per_batch // length for each run, so every '
                     'length trains on the same tokens per step (0: the config\'s batch_size).')


@dataclasses.dataclass(frozen=True)
class Run:
  kind: str
  length: int
  seed: int
  workdir: str

  def command(self, config: str, size: str = '', overrides: Sequence[str] = (),
              tokens_per_batch: int = 0) -> list[str]:
    arg = ','.join(filter(None, [self.kind, size]))
    cmd = [sys.executable, '-m', 'longjax.main', f'--config={config}:{arg}',
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
         seeds: Iterable[int]) -> list[Run]:
  return [Run(kind, int(length), int(seed), os.path.join(workdir, kind, f'L{length}_s{seed}'))
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


def main(argv):
  del argv
  runs = plan(FLAGS.workdir, FLAGS.kinds, FLAGS.lengths, FLAGS.seeds)
  if FLAGS.tokens_per_batch:
    for run in runs:  # Fail before launching anything.
      batch_for(FLAGS.tokens_per_batch, run.length)
  # The model must accept the longest length of the sweep.
  overrides = list(FLAGS.set)
  if not any(o.startswith('model.max_len=') for o in overrides):
    overrides.append(f'model.max_len={max(max(r.length for r in runs), 2048)}')
  for i, run in enumerate(runs):
    cmd = run.command(FLAGS.config, FLAGS.size, overrides, FLAGS.tokens_per_batch)
    if FLAGS.print_only:
      print(shlex.join(cmd))
      continue
    if is_finished(run.workdir):
      print(f'[{i + 1}/{len(runs)}] done already: {run.workdir}', flush=True)
      continue
    print(f'[{i + 1}/{len(runs)}] {shlex.join(cmd)}', flush=True)
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, 'sweep.log'), 'a') as log:
      code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code:
      print(f'  failed with exit code {code}; see {run.workdir}/sweep.log', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'lengths', 'kinds', 'workdir'])
  app.run(main)
