"""Compare runs across sequence lengths and attention kinds: a CSV and plots.

    python -m experiments.compare /tmp/passkey_sweep --out=/tmp/passkey_report

reads every run workdir under the given paths (a directory holding
`metrics.jsonl` and `config.json`), and writes:
  * `runs.csv`: one row per run — kind, length, seed, the final eval metrics
    (accuracy, perplexity, bits per byte, loss), training tokens/s (median
    over the logged steps) and peak memory;
  * `<metric>_vs_length.png` for each eval metric present, one line per kind
    (mean over seeds, the spread as error bars);
  * `tokens_per_sec_vs_length.png`, `memory_vs_length.png`, `loss_curves.png`.

From a notebook:

    from experiments import compare
    runs = compare.load_runs(['/tmp/passkey_sweep'])
    rows = compare.table(runs)
    compare.plot_vs_length(rows, 'accuracy', 'acc.png')
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
import sys
from typing import Optional, Sequence

EVAL_METRICS = ('accuracy', 'perplexity', 'bits_per_byte', 'loss', 'exact_match', 'rouge1',
                'rougeL', 'bleu')
MEMORY_FIELDS = ('peak_memory_bytes', 'compiled_memory_bytes', 'peak_rss_bytes')


@dataclasses.dataclass
class RunRecord:
  workdir: str
  config: dict
  metrics: list[dict]

  @property
  def kind(self) -> str:
    return self.config['model']['attention']['kind']

  @property
  def length(self) -> int:
    return int(self.config['seq_len'])

  @property
  def seed(self) -> int:
    return int(self.config.get('seed', 0))

  def records(self, split: str) -> list[dict]:
    return [m for m in self.metrics if m.get('split') == split]


def find_run_dirs(paths: Sequence[str]) -> list[str]:
  found = []
  for path in paths:
    for root, _, files in os.walk(path):
      if 'metrics.jsonl' in files and 'config.json' in files:
        found.append(root)
  return sorted(set(found))


def load_runs(paths: Sequence[str]) -> list[RunRecord]:
  runs = []
  for workdir in find_run_dirs(paths):
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      metrics = [json.loads(line) for line in f if line.strip()]
    runs.append(RunRecord(workdir, config, metrics))
  return runs


def _final_eval(run: RunRecord) -> dict:
  evals = run.records('eval')
  if not evals:
    return {}
  last_step = max(m['step'] for m in evals)
  merged = {}
  for m in evals:  # several eval records may share the last step (e.g. decode scores)
    if m['step'] == last_step:
      merged.update(m)
  for m in run.records('decode'):
    if m['step'] == last_step:
      merged.update({k: v for k, v in m.items() if k not in ('step', 'split')})
  return merged


def _peak_memory(run: RunRecord) -> Optional[float]:
  for field in MEMORY_FIELDS:
    values = [m[field] for m in run.metrics if m.get(field) is not None]
    if values:
      return float(max(values))
  return None


def table(runs: Sequence[RunRecord]) -> list[dict]:
  """One row per run (see module docstring), sorted by kind, length, seed."""
  rows = []
  for run in runs:
    final = _final_eval(run)
    speeds = [m['tokens_per_sec'] for m in run.records('train') if m.get('tokens_per_sec')]
    row = dict(kind=run.kind, length=run.length, seed=run.seed,
               dataset=run.config.get('dataset', {}).get('name', ''),
               step=final.get('step'), workdir=run.workdir,
               tokens_per_sec=statistics.median(speeds[1:] or speeds) if speeds else None,
               peak_memory_bytes=_peak_memory(run))
    for metric in EVAL_METRICS:
      row[metric] = final.get(metric)
    rows.append(row)
  return sorted(rows, key=lambda r: (r['kind'], r['length'], r['seed']))


def write_csv(rows: Sequence[dict], path: str) -> None:
  columns = list(rows[0]) if rows else []
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def _by_kind(rows, metric):
  """{kind: [(length, mean, min, max)]} over seeds, for rows with the metric."""
  series = {}
  for kind in dict.fromkeys(r['kind'] for r in rows):
    points = []
    for length in sorted({r['length'] for r in rows if r['kind'] == kind}):
      values = [r[metric] for r in rows
                if r['kind'] == kind and r['length'] == length and r.get(metric) is not None]
      if values:
        points.append((length, statistics.mean(values), min(values), max(values)))
    if points:
      series[kind] = points
  return series


def plot_vs_length(rows: Sequence[dict], metric: str, path: str, *, ylabel: str = '',
                   logy: bool = False, title: str = '') -> bool:
  """One line per kind of `metric` against length; False when no run has it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  series = _by_kind(rows, metric)
  if not series:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, points in series.items():
    lengths, means, lows, highs = zip(*points)
    ax.errorbar(lengths, means, yerr=[[m - lo for m, lo in zip(means, lows)],
                                      [hi - m for m, hi in zip(means, highs)]],
                marker='o', capsize=3, label=kind)
  ax.set_xscale('log', base=2)
  if logy:
    ax.set_yscale('log')
  ax.set_xlabel('sequence length')
  ax.set_ylabel(ylabel or metric)
  ax.set_title(title or f'{metric} vs length')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_loss_curves(runs: Sequence[RunRecord], path: str) -> bool:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  # One colour per kind, one line style per length: a sweep's curves stay readable.
  kinds = sorted({r.kind for r in runs})
  lengths = sorted({r.length for r in runs})
  styles = ['-', '--', ':', '-.']
  for run in sorted(runs, key=lambda r: (r.kind, r.length, r.seed)):
    train = [(m['step'], m['loss']) for m in run.records('train') if 'loss' in m]
    if train:
      steps, losses = zip(*train)
      ax.plot(steps, losses, label=f'{run.kind} L={run.length} s={run.seed}', alpha=0.85,
              color=f'C{kinds.index(run.kind) % 10}',
              linestyle=styles[lengths.index(run.length) % len(styles)])
      drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel('step')
  ax.set_ylabel('training loss')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def report(paths: Sequence[str], out: str) -> list[dict]:
  """Writes runs.csv and every plot the runs have data for; returns the rows."""
  os.makedirs(out, exist_ok=True)
  runs = load_runs(paths)
  if not runs:
    raise SystemExit(f'No run workdirs (metrics.jsonl + config.json) under {list(paths)}.')
  rows = table(runs)
  write_csv(rows, os.path.join(out, 'runs.csv'))
  for metric in EVAL_METRICS:
    plot_vs_length(rows, metric, os.path.join(out, f'{metric}_vs_length.png'),
                   logy=metric == 'perplexity')
  plot_vs_length(rows, 'tokens_per_sec', os.path.join(out, 'tokens_per_sec_vs_length.png'),
                 ylabel='training tokens / s', logy=True)
  plot_vs_length(rows, 'peak_memory_bytes', os.path.join(out, 'memory_vs_length.png'),
                 ylabel='peak memory (bytes)', logy=True)
  plot_loss_curves(runs, os.path.join(out, 'loss_curves.png'))
  return rows


def main(argv: Sequence[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('paths', nargs='+', help='run workdirs or directories holding them')
  parser.add_argument('--out', required=True, help='where runs.csv and the plots go')
  args = parser.parse_args(argv)
  rows = report(args.paths, args.out)
  columns = ['kind', 'length', 'seed', 'accuracy', 'perplexity', 'bits_per_byte',
             'tokens_per_sec', 'peak_memory_bytes']
  print(' | '.join(columns))
  for row in rows:
    print(' | '.join('' if row.get(c) is None else
                     (f'{row[c]:.4g}' if isinstance(row[c], float) else str(row[c]))
                     for c in columns))


if __name__ == '__main__':
  main(sys.argv[1:])
