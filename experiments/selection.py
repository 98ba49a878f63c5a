"""What a comparison reports: whether each run trained to the criterion, the best
learning rate per (task, kind, length), and mean +- std over seeds.

* `converged(run)`: the sweep's stopping criterion (experiments.budget.CRITERION):
  the eval losses at the run's own length over the last 20% of its steps vary
  by at most 1% ((max - min) / min), from at least two evals. None when it
  cannot tell (fewer than two evals there): add evals, or train longer.
* `best_learning_rates(rows)`: a learning-rate sweep (`experiments.sweep
  --learning_rates`) keeps, for every (dataset, kind, length), the rate with the
  lowest mean eval loss over seeds at the run's own length; `at_best` keeps the
  rows of those runs (all their eval lengths), which the plots and summary use.
  The choice is made on the eval split the tables report — a tuning split would
  be stricter, and the summary says which rate was kept.
* `summary(rows)`: one row per (dataset, kind, length, eval_seq_len) with the
  seeds, how many converged, and `<metric>_mean` / `<metric>_std` of every
  eval metric (std over seeds, 0 for one seed).
"""
from __future__ import annotations

import statistics
from typing import Optional, Sequence

TAIL = 0.2        # the last fraction of the steps the criterion looks at
TOLERANCE = 0.01  # relative spread of the eval loss there that counts as flat


def learning_rate(config: dict) -> Optional[float]:
  value = config.get('learning_rate')
  return None if value is None else float(value)


def converged(run, *, tail: float = TAIL, tolerance: float = TOLERANCE) -> Optional[bool]:
  """Whether the run's eval loss at its own length is flat over the last `tail` of
  its steps (None: fewer than two evals there to tell)."""
  last = int(run.config.get('num_train_steps') or 0)
  losses = [m['loss'] for m in run.records('eval')
            if run.measured_length(m) == run.length and isinstance(m.get('loss'), (int, float))
            and m.get('step', -1) >= (1 - tail) * last]
  if len(losses) < 2:
    return None
  low = min(losses)
  return (max(losses) - low) <= tolerance * abs(low)


def _group(row: dict) -> tuple:
  return (str(row.get('dataset')), row['kind'], row['length'])


def best_learning_rates(rows: Sequence[dict], metric: str = 'loss') -> dict:
  """{(dataset, kind, length): the learning rate with the lowest mean `metric` over
  seeds}, from the rows at each run's own length (groups with one rate included)."""
  by_rate: dict = {}
  for row in rows:
    if row['eval_seq_len'] == row['length'] and isinstance(row.get(metric), (int, float)):
      by_rate.setdefault(_group(row), {}).setdefault(row.get('learning_rate'), []).append(
          row[metric])
  return {group: min(rates, key=lambda rate: statistics.mean(rates[rate]))
          for group, rates in by_rate.items()}


def at_best(rows: Sequence[dict], metric: str = 'loss') -> list[dict]:
  """The rows of the runs at their group's best learning rate (every row of a
  group that has no eval loss yet, so nothing is hidden)."""
  best = best_learning_rates(rows, metric)
  return [row for row in rows
          if _group(row) not in best or row.get('learning_rate') == best[_group(row)]]


def summary(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
  """Mean and std over seeds of `metrics`, per (dataset, kind, length, eval_seq_len),
  at the best learning rate."""
  groups: dict = {}
  for row in at_best(rows):
    groups.setdefault(_group(row) + (row['eval_seq_len'],), []).append(row)
  out = []
  for (dataset, kind, length, eval_seq_len), members in sorted(groups.items(), key=str):
    entry = dict(dataset=dataset, kind=kind, length=length, eval_seq_len=eval_seq_len,
                 learning_rate=members[0].get('learning_rate'),
                 seeds=len(members),
                 converged=sum(1 for r in members if r.get('converged') is True))
    for metric in metrics:
      values = [r[metric] for r in members if isinstance(r.get(metric), (int, float))]
      entry[f'{metric}_mean'] = statistics.mean(values) if values else None
      entry[f'{metric}_std'] = statistics.stdev(values) if len(values) > 1 else (
          0.0 if values else None)
    out.append(entry)
  return out
