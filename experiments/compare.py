"""Compare runs across sequence lengths and attention kinds: a CSV and plots.

    python -m experiments.compare /tmp/passkey_sweep --out=/tmp/passkey_report

reads every run workdir under the given paths (a directory holding
`metrics.jsonl` and `config.json`), and writes:
  * `runs.csv`: one row per run and eval length (columns: 'runs.csv columns' in --help).
    A run's row for its own training length holds its latest eval at that
    length, its latest decode scores and its training speed and memory; an
    eval at another length (`--mode=eval --config.eval_seq_len=N`) is a row
    of its own with `eval_seq_len` N, never merged into the training row;
  * `summary.csv`: mean and std over seeds of every metric per (dataset, kind,
    length, eval length), at each group's best learning rate, with how many of
    its runs met the stopping criterion (experiments/selection.py);
  * `<metric>_vs_length.png` for each eval and decode metric present, one line
    per attention (mean over seeds, the spread as error bars), at each run's
    own training length and, in a learning-rate sweep, its best rate; with runs of several datasets (a suite's tasks,
    `experiments.sweep --suite=ruler`), in `<dataset>/` for each;
  * `tokens_per_sec_vs_length.png`, `memory_vs_length.png`, `loss_curves.png`;
  * `needle_depth_<kind>.png`: accuracy by needle depth and length, from depth
    probes (`--mode=eval --config.synthetic.needle_depth=d`, or passkey_depth), which
    are kept out of runs.csv;
  * `context_curve_L<length>.png`: the runs' `--mode=context_eval` curves (loss on
    fixed targets against context), one line per kind (the mean over its seeds), per
    training length.

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

# The plotting functions, where notebooks look for them.
# pylint: disable-next=unused-import
from experiments.plots import (format_length_axis, length_label, memory_plot, own_length,
                               plot_loss_curves, plot_vs_length)
from experiments import selection

COLUMNS_DOC = """\
  kind            the run's attention: model.attention.layer_pattern joined by
                  commas when set (e.g. local,local,full), else model.attention.kind
  length          training length (config.json seq_len)
  eval_seq_len    the length the eval on this row measured (= length for the run's own eval)
  seed, dataset   config.json seed and dataset.name
  learning_rate   config.json learning_rate (experiments.sweep --learning_rates)
  step            step of the eval record on this row
  accuracy, exact_match, perplexity, bits_per_byte, loss, ...
                  every metric of that eval record (teacher-forced; exact_match
                  here is every answer token right under teacher forcing)
  mean_span       adaptive span's mean learned span in tokens (eval record, else last
                  train record)
  span/layer_<i>  layer i's mean learned span over its heads, in tokens (eval record,
                  else last train record)
  span/layer_<i>/head_<h>
                  head h's learned span (eval records)
  decode_step, decode_rouge1, decode_rouge2, decode_rougeL, decode_bleu,
  decode_exact_match, ...
                  the latest --mode=decode scores (generated text), if any
  tokens_per_sec  median training tokens/s over the logged steps after the first
  converged       whether the eval loss was flat at the end (experiments.budget.CRITERION);
                  empty when fewer than two evals fall in the last 20% of steps
  compiled_memory_bytes  XLA's memory plan of the train step, bytes per device
  peak_memory_bytes      measured peak: device peak on GPU/TPU, on CPU the
                  process's peak RSS (includes compilation)
  workdir         the run's directory
Training columns (tokens_per_sec, memory, mean_span and span/layer_<i> from
training) are filled only on the row at the run's own length."""

# Always columns (the notebooks read them), in this order; any other metric an
# eval record carries follows them.
EVAL_METRICS = ('accuracy', 'exact_match', 'perplexity', 'bits_per_byte', 'loss')
DECODE_METRICS = ('rouge1', 'rouge2', 'rougeL', 'bleu', 'exact_match')
# What a record says about itself, not something it measured.
RECORD_KEYS = ('step', 'split', 'seq_len')
TRAIN_COLUMNS = ('tokens_per_sec', 'compiled_memory_bytes', 'peak_memory_bytes', 'converged')
DECODE_PREFIX = 'decode_'
# Properties of the weights, not measurements at a length: exported, not plotted.
SPAN_COLUMNS = ('mean_span',)
SPAN_PREFIX = 'span/'


def is_span_column(name: str) -> bool:
  return name in SPAN_COLUMNS or name.startswith(SPAN_PREFIX)


def attention_label(config: dict) -> str:
  """The attention a run used: its layer pattern when set, else its kind."""
  attention = config.get('model', {}).get('attention', {})
  pattern = attention.get('layer_pattern') or ()
  if isinstance(pattern, str):
    pattern = [pattern]
  # A pattern may be recorded as a list of kinds or as one 'a,b,c' string.
  kinds = [k.strip() for item in pattern for k in str(item).split(',') if k.strip()]
  return ','.join(kinds) if kinds else str(attention.get('kind', ''))


@dataclasses.dataclass
class RunRecord:
  workdir: str
  config: dict
  metrics: list[dict]

  @property
  def kind(self) -> str:
    return attention_label(self.config)

  @property
  def length(self) -> int:
    return int(self.config['seq_len'])

  @property
  def seed(self) -> int:
    return int(self.config.get('seed', 0))

  @property
  def needle_depth(self) -> Optional[float]:
    """The fixed depth the run trained with (None: uniform, or no needle)."""
    synthetic = self.config.get('synthetic', {})
    task = str(self.config.get('dataset', {}).get('name', ''))
    depth = synthetic.get('passkey_depth' if task == 'passkey' else 'needle_depth', -1)
    return None if depth in (-1, None) else float(depth)

  def records(self, split: str, *, probes: bool = False) -> list[dict]:
    """The run's `split` records; an eval at another needle depth than the run's
    (a depth probe, for the heatmaps) only with probes=True."""
    return [m for m in self.metrics if m.get('split') == split and
            (probes or m.get('needle_depth', self.needle_depth) == self.needle_depth)]

  def measured_length(self, record: dict) -> int:
    """The eval length of a record; records written before `seq_len` was logged:
    the training length."""
    return int(record.get('seq_len') or self.length)

  def latest(self, split: str, length: Optional[int] = None) -> dict:
    """The `split` record at `length` (default: the training length) with the
    highest step; of records at the same step, the one written last."""
    length = self.length if length is None else length
    found = [(m.get('step', -1), i, m) for i, m in enumerate(self.records(split))
             if self.measured_length(m) == length]
    return max(found, key=lambda t: t[:2])[2] if found else {}

  def measured_lengths(self) -> list[int]:
    """The training length and every length an eval or decode record measured."""
    lengths = {self.length}
    lengths.update(self.measured_length(m) for split in ('eval', 'decode')
                   for m in self.records(split))
    return sorted(lengths)


def find_run_dirs(paths: Sequence[str]) -> list[str]:
  found = []
  for path in paths:
    for root, _, files in os.walk(path):
      if 'metrics.jsonl' in files and 'config.json' in files:
        found.append(root)
  return sorted(set(found))


def load_run(workdir: str) -> RunRecord:
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics = [json.loads(line) for line in f if line.strip()]
  return RunRecord(workdir, config, metrics)


def load_runs(paths: Sequence[str]) -> list[RunRecord]:
  return [load_run(workdir) for workdir in find_run_dirs(paths)]


def _measured(record: dict) -> dict:
  return {k: v for k, v in record.items() if k not in RECORD_KEYS}


def _largest(run: RunRecord, *fields: str) -> Optional[float]:
  """The largest value any record gives for the first of `fields` that one has."""
  for field in fields:
    values = [m[field] for m in run.metrics if m.get(field) is not None]
    if values:
      return float(max(values))
  return None


def _train_columns(run: RunRecord) -> dict:
  train = run.records('train')
  speeds = [m['tokens_per_sec'] for m in train if m.get('tokens_per_sec')]
  spans = [m['mean_span'] for m in train if m.get('mean_span') is not None]
  # Each layer's span: of the last train record that has one.
  layers = next(({k: v for k, v in m.items() if k.startswith(SPAN_PREFIX)}
                 for m in reversed(train) if any(k.startswith(SPAN_PREFIX) for k in m)), {})
  return dict(
      **layers,
      # The first logged interval includes compilation.
      tokens_per_sec=statistics.median(speeds[1:] or speeds) if speeds else None,
      compiled_memory_bytes=_largest(run, 'compiled_memory_bytes'),
      # peak_rss_bytes: the same measurement, as older runs named it.
      peak_memory_bytes=_largest(run, 'peak_memory_bytes', 'peak_rss_bytes'),
      converged=selection.converged(run),
      mean_span=spans[-1] if spans else None)


def _row(run: RunRecord, length: int) -> dict:
  evaluation = run.latest('eval', length)
  decoded = run.latest('decode', length)
  row = dict(kind=run.kind, length=run.length, eval_seq_len=length, seed=run.seed,
             learning_rate=selection.learning_rate(run.config),
             dataset=run.config.get('dataset', {}).get('name', ''),
             step=evaluation.get('step'))
  row.update(_measured(evaluation))
  if decoded:
    row[DECODE_PREFIX + 'step'] = decoded.get('step')
    # decode_seconds stays decode_seconds, rouge1 becomes decode_rouge1.
    row.update({k if k.startswith(DECODE_PREFIX) else DECODE_PREFIX + k: v
                for k, v in _measured(decoded).items()})
  if length == run.length:
    train = _train_columns(run)
    # Spans are a property of the weights: the eval record's, when it has them.
    for key in [k for k in train if is_span_column(k)]:
      train[key] = row.get(key, train[key])
    row.update(train)
  row['workdir'] = run.workdir
  return row


def columns(rows: Sequence[dict]) -> list[str]:
  """CSV columns: identity, eval metrics, decode scores, training, workdir."""
  present = dict.fromkeys(key for row in rows for key in row)
  head = ['kind', 'length', 'eval_seq_len', 'seed', 'learning_rate', 'dataset', 'step',
          *EVAL_METRICS]
  tail = [*TRAIN_COLUMNS, 'workdir']
  decode_head = [DECODE_PREFIX + k for k in ('step', *DECODE_METRICS)]
  decode = [c for c in decode_head if c in present]
  decode += sorted(c for c in present if c.startswith(DECODE_PREFIX) and c not in decode_head)
  other = sorted(c for c in present if c not in head + tail + decode)
  return head + other + decode + tail


def table(runs: Sequence[RunRecord]) -> list[dict]:
  """Rows of runs.csv (see COLUMNS_DOC), sorted by kind, length, seed, eval length;
  every row has every column (None where it has no value)."""
  rows = [_row(run, length) for run in runs for length in run.measured_lengths()]
  names = columns(rows)
  rows = [{name: row.get(name) for name in names} for row in rows]
  return sorted(rows, key=lambda r: (r['kind'], r['length'], r['learning_rate'] or 0.0,
                                     r['seed'], r['eval_seq_len']))


def metric_columns(rows: Sequence[dict]) -> list[str]:
  """The eval metrics and decode scores present in rows, in column order (what is
  plotted against length; not decode timings or counts)."""
  names = columns(rows)
  start, end = names.index('step') + 1, names.index(TRAIN_COLUMNS[0])
  scores = {DECODE_PREFIX + k for k in DECODE_METRICS}
  return [c for c in names[start:end]
          if not is_span_column(c) and (not c.startswith(DECODE_PREFIX) or c in scores) and
          any(isinstance(r.get(c), (int, float)) for r in rows)]


def write_csv(rows: Sequence[dict], path: str) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns(rows))
    writer.writeheader()
    writer.writerows(rows)


def report(paths: Sequence[str], out: str) -> list[dict]:
  """Writes runs.csv and every plot the runs have data for; returns the rows."""
  os.makedirs(out, exist_ok=True)
  runs = load_runs(paths)
  if not runs:
    raise SystemExit(f'No run workdirs (metrics.jsonl + config.json) under {list(paths)}.')
  rows = table(runs)
  write_csv(rows, os.path.join(out, 'runs.csv'))
  summary = selection.summary(rows, metric_columns(rows))
  with open(os.path.join(out, 'summary.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, list(dict.fromkeys(k for row in summary for k in row)))
    writer.writeheader()
    writer.writerows(summary)
  rows = selection.at_best(rows)  # the plots: each (kind, length) at its best learning rate
  datasets = sorted({str(row.get('dataset')) for row in rows})
  for dataset in datasets:  # a suite's tasks (experiments.sweep --suite): curves per task
    task_rows = [row for row in rows if str(row.get('dataset')) == dataset]
    task_out = out if len(datasets) == 1 else os.path.join(out, dataset)
    os.makedirs(task_out, exist_ok=True)
    for metric in metric_columns(task_rows):
      plot_vs_length(task_rows, metric, os.path.join(task_out, f'{metric}_vs_length.png'),
                     logy=metric == 'perplexity',
                     title='' if len(datasets) == 1 else f'{dataset}: {metric}')
  plot_vs_length(rows, 'tokens_per_sec', os.path.join(out, 'tokens_per_sec_vs_length.png'),
                 ylabel='training tokens / s', logy=True)
  memory = memory_plot(rows)
  if memory:
    plot_vs_length(rows, memory.metric, os.path.join(out, 'memory_vs_length.png'),
                   ylabel=memory.ylabel, title=memory.title, logy=True, scale=2**-20)
  plot_loss_curves(runs, os.path.join(out, 'loss_curves.png'))
  plot_context_curves(runs, out)
  for dataset in datasets:
    plot_depth_heatmaps([r for r in runs if str(r.config.get('dataset', {}).get('name'))
                         == dataset], out if len(datasets) == 1 else os.path.join(out, dataset))
  return rows


def depth_grid(runs: Sequence[RunRecord], metric: str = 'accuracy') -> dict:
  """{kind: {(needle_depth, length): mean over seeds of the latest eval at that
  depth}} from the depth probes (`--mode=eval --config.synthetic.needle_depth=d`)."""
  cells: dict = {}
  for run in runs:
    latest: dict = {}
    for record in run.records('eval', probes=True):
      depth = record.get('needle_depth')
      if depth is not None and metric in record and run.measured_length(record) == run.length:
        if record.get('step', -1) >= latest.get(depth, {}).get('step', -1):
          latest[depth] = record
    for depth, record in latest.items():
      cells.setdefault(run.kind, {}).setdefault((float(depth), run.length), []).append(
          float(record[metric]))
  return {kind: {key: statistics.mean(values) for key, values in grid.items()}
          for kind, grid in cells.items()}


def plot_depth_heatmaps(runs: Sequence[RunRecord], out: str, metric: str = 'accuracy') -> list:
  """`needle_depth_<kind>.png`: metric by needle depth (rows) and length (columns)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  for kind, grid in sorted(depth_grid(runs, metric).items()):
    depths = sorted({d for d, _ in grid})
    lengths = sorted({n for _, n in grid})
    values = [[grid.get((d, n), float('nan')) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f'{d:.2f}' for d in depths])
    ax.set_xlabel('length')
    ax.set_ylabel('needle depth')
    ax.set_title(f'{kind}: {metric}')
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    paths.append(os.path.join(out, f'needle_depth_{kind.replace(",", "+")}.png'))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def plot_context_curves(runs: Sequence[RunRecord], out: str) -> list[str]:
  """`context_curve_L<length>.png`: the runs' --mode=context_eval curves overlaid, one
  figure per training length (its extrapolated region shaded); returns the paths."""
  from longjax.train import context_eval  # pylint: disable=g-import-not-at-top
  by_length: dict[int, dict[str, list]] = {}
  for run in runs:
    path = os.path.join(run.workdir, context_eval.OUT_DIR, 'context_curve.csv')
    if os.path.exists(path):
      with open(path, newline='') as f:
        by_length.setdefault(run.length, {}).setdefault(run.kind, []).append(
            list(csv.DictReader(f)))
  paths = []
  for length, by_kind in sorted(by_length.items()):
    # One line per kind: the mean over its seeds of the loss and of the 95% interval.
    curves = {f'{kind} ({len(seeds)} seed{"s" * (len(seeds) > 1)})': _mean_curve(seeds)
              for kind, seeds in by_kind.items()}
    paths.append(os.path.join(out, f'context_curve_L{length}.png'))
    context_eval.plot_context_curves(curves, length, paths[-1])
  return paths


def _mean_curve(curves: Sequence[list]) -> list[dict]:
  """Context-curve rows averaged over runs, at the contexts every run has."""
  common = set.intersection(*({r['context'] for r in rows} for rows in curves))
  out = []
  for row in curves[0]:
    if row['context'] in common:
      same = [next(r for r in rows if r['context'] == row['context']) for rows in curves]
      out.append(dict(row, **{k: statistics.mean(float(r[k]) for r in same)
                              for k in ('loss', 'ci_low', 'ci_high')}))
  return out


PRINTED = ('kind', 'length', 'eval_seq_len', 'seed', 'step', 'accuracy', 'exact_match',
           'perplexity', 'bits_per_byte', 'loss', 'mean_span', 'decode_exact_match',
           'decode_rougeL', 'decode_bleu', 'tokens_per_sec', 'compiled_memory_bytes',
           'peak_memory_bytes')


def main(argv: Sequence[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__ + '\nruns.csv columns:\n' + COLUMNS_DOC,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('paths', nargs='+', help='run workdirs or directories holding them')
  parser.add_argument('--out', required=True, help='where runs.csv and the plots go')
  args = parser.parse_args(argv)
  rows = report(args.paths, args.out)
  shown = [c for c in PRINTED if any(r.get(c) is not None for r in rows)]
  print(' | '.join(shown))
  for row in rows:
    print(' | '.join('' if row.get(c) is None else
                     (f'{row[c]:.4g}' if isinstance(row[c], float) else str(row[c]))
                     for c in shown))
  print(f'runs.csv and plots in {args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
