"""The comparison's plots: metrics against sequence length, memory, loss curves.

`experiments.compare` makes the rows (one dict per run and eval length) and
re-exports these functions. matplotlib is imported inside each function, so
reading runs needs no plotting stack.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Optional, Sequence

# Axis labels; a metric not listed is labelled by its name.
LABELS = {
    'accuracy': 'eval accuracy', 'exact_match': 'eval exact match (teacher-forced)',
    'perplexity': 'eval perplexity', 'bits_per_byte': 'eval bits per byte',
    'loss': 'eval loss (nats per target token)', 'decode_exact_match': 'decode exact match',
    'decode_rouge1': 'decode ROUGE-1', 'decode_rouge2': 'decode ROUGE-2',
    'decode_rougeL': 'decode ROUGE-L', 'decode_bleu': 'decode BLEU',
    'tokens_per_sec': 'training tokens / s',
}


def own_length(row: dict) -> bool:
  """True for the row of a run's eval at its training length."""
  return row.get('eval_seq_len', row['length']) == row['length']


def series_by_kind(rows: Sequence[dict], metric: str) -> dict:
  """{kind: [(length, mean, min, max)]} over seeds, from the rows at their own length
  (an eval at another length is not the run's result at its length)."""
  rows = [r for r in rows if own_length(r) and isinstance(r.get(metric), (int, float))]
  series = {}
  for kind in dict.fromkeys(r['kind'] for r in rows):
    points = []
    for length in sorted({r['length'] for r in rows if r['kind'] == kind}):
      values = [r[metric] for r in rows if r['kind'] == kind and r['length'] == length]
      points.append((length, statistics.mean(values), min(values), max(values)))
    series[kind] = points
  return series


def length_label(length: int) -> str:
  """32 -> '32', 1024 -> '1k', 1536 -> '1.5k', 16384 -> '16k', 2**20 -> '1M'."""
  for unit, suffix in ((2**20, 'M'), (2**10, 'k')):
    if length >= unit:
      return f'{length / unit:.3g}{suffix}'
  return str(length)


def format_length_axis(ax, lengths: Sequence[int]) -> None:
  """A log2 x axis with a tick at each length, labelled 32, 64, ..., 1k, 4k."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  lengths = sorted(set(lengths))
  ax.set_xscale('log', base=2)
  ax.set_xticks(lengths)
  ax.set_xticklabels([length_label(n) for n in lengths])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel('sequence length (tokens)')


def _plain_log_y(ax, low: float, high: float) -> None:
  """Plain numbers (600, 800, 1000) on a log y axis instead of 6x10^2."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  plain = ticker.FuncFormatter(lambda v, _: f'{v:,.0f}' if v >= 1 else f'{v:g}')
  ax.yaxis.set_major_formatter(plain)
  # Within about a decade there may be no major tick at all: label the minor ones.
  ax.yaxis.set_minor_formatter(plain if high < 20 * low else ticker.NullFormatter())


def plot_vs_length(rows: Sequence[dict], metric: str, path: str, *, ylabel: str = '',
                   logy: bool = False, title: str = '', scale: float = 1.0) -> bool:
  """One line per kind of `metric` (times `scale`) against length; False when no run has it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  series = series_by_kind(rows, metric)
  if not series:
    return False
  ylabel = ylabel or LABELS.get(metric, metric.replace('_', ' '))
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, points in series.items():
    lengths, means, lows, highs = zip(*points)
    ax.errorbar(lengths, [m * scale for m in means],
                yerr=[[(m - lo) * scale for m, lo in zip(means, lows)],
                      [(hi - m) * scale for m, hi in zip(means, highs)]],
                marker='o', capsize=3, label=kind)
  format_length_axis(ax, [p[0] for points in series.values() for p in points])
  if logy:
    ax.set_yscale('log')
    values = [p[1] * scale for points in series.values() for p in points]
    _plain_log_y(ax, min(values), max(values))
  ax.set_ylabel(ylabel)
  ax.set_title(title or f'{ylabel} vs sequence length', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


@dataclasses.dataclass(frozen=True)
class MemoryPlot:
  metric: str
  ylabel: str
  title: str


def memory_plot(rows: Sequence[dict]) -> Optional[MemoryPlot]:
  """What memory_vs_length.png shows: XLA's plan of the train step when the runs
  logged it (the same measurement for every kind), else the measured peak, which
  on CPU is the whole process's RSS, compilation included."""
  def logged(metric):
    return any(own_length(r) and r.get(metric) is not None for r in rows)
  if logged('compiled_memory_bytes'):
    return MemoryPlot('compiled_memory_bytes',
                      'train-step memory, MiB per device (XLA memory analysis)',
                      'XLA memory analysis of the compiled train step\n'
                      '(arguments + outputs + temporaries - donated: the same measure for '
                      'every kind)')
  if logged('peak_memory_bytes'):
    return MemoryPlot('peak_memory_bytes', 'peak process RSS (CPU; includes compilation), MiB',
                      'peak memory vs sequence length\n'
                      '(on GPU/TPU: the device\'s peak bytes in use)')
  return None


def plot_loss_curves(runs: Sequence, path: str) -> bool:
  """Training loss against step, one line per run (compare.RunRecord)."""
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
      ax.plot(steps, losses, label=f'{run.kind} L={length_label(run.length)} s={run.seed}',
              alpha=0.85, color=f'C{kinds.index(run.kind) % 10}',
              linestyle=styles[lengths.index(run.length) % len(styles)])
      drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (nats per target token)')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
