"""The stopping criterion, the best learning rate per (kind, length) and mean +- std over seeds."""
import csv
import json
import os

import pytest

from experiments import compare, selection
from tests.experiments.fake_runs import write_run


def _evals(losses, *, every=10, length=64):
  return [dict(step=every * (i + 1), split='eval', loss=loss, seq_len=length)
          for i, loss in enumerate(losses)]


@pytest.mark.parametrize('losses, expected', [
    # 10 evals over 100 steps: the last 20% of steps hold the evals at 80, 90, 100.
    ([5, 4, 3, 2.5, 2.2, 2.1, 2.05, 2.0, 1.995, 1.99], True),    # 2.0 -> 1.99: 0.5%
    ([5, 4, 3, 2.5, 2.2, 2.1, 2.05, 2.0, 1.96, 1.93], False),    # 2.0 -> 1.93: 3.6%
    ([5, 4, 3, 2.5, 2.2, 2.1, 2.05], None),                      # no eval after step 80
])
def test_converged_looks_at_the_last_fifth_of_the_steps(tmp_path, losses, expected):
  workdir = write_run(str(tmp_path), 'local', 64, 0, _evals(losses), last_step=100)
  assert selection.converged(compare.load_run(workdir)) is expected


def _lr_run(root, kind, lr, seed, loss):
  workdir = write_run(os.path.join(root, f'lr{lr}'), kind, 64, seed,
                      _evals([loss + 0.5, loss]), last_step=20)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['learning_rate'] = lr
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)


def test_best_learning_rate_per_kind_and_summary_over_seeds(tmp_path):
  root = str(tmp_path)
  # local: 3e-3 wins on mean loss over seeds (1.0, 1.2 -> 1.1) against 1e-3 (1.3, 1.5);
  # full: 1e-3 wins (0.8, 0.9) against 3e-3 (2.0, 0.5 -> mean 1.25).
  for kind, lr, losses in [('local', 1e-3, (1.3, 1.5)), ('local', 3e-3, (1.0, 1.2)),
                           ('full', 1e-3, (0.8, 0.9)), ('full', 3e-3, (2.0, 0.5))]:
    for seed, loss in enumerate(losses):
      _lr_run(root, kind, lr, seed, loss)
  rows = compare.table(compare.load_runs([root]))
  assert {r['learning_rate'] for r in rows} == {1e-3, 3e-3}
  assert selection.best_learning_rates(rows) == {('passkey', 'local', 64): 3e-3,
                                                 ('passkey', 'full', 64): 1e-3}
  assert {(r['kind'], r['learning_rate']) for r in selection.at_best(rows)} == {
      ('local', 3e-3), ('full', 1e-3)}
  summary = {r['kind']: r for r in selection.summary(rows, ['loss'])}
  assert summary['local']['learning_rate'] == 3e-3 and summary['local']['seeds'] == 2
  assert summary['local']['loss_mean'] == pytest.approx(1.1)
  assert summary['local']['loss_std'] == pytest.approx(0.1414213, rel=1e-5)  # sample std
  assert summary['full']['loss_mean'] == pytest.approx(0.85)
  # Evals at steps 10 and 20 of 20: only one lies in the last 20%, so none is known converged.
  assert summary['full']['converged'] == 0
  assert all(r['converged'] is None for r in rows)

  out = str(tmp_path / 'report')
  compare.report([root], out)
  with open(os.path.join(out, 'summary.csv'), newline='') as f:
    written = list(csv.DictReader(f))
  assert {(r['kind'], float(r['learning_rate'])) for r in written} == {
      ('local', 3e-3), ('full', 1e-3)}
  assert float(next(r for r in written if r['kind'] == 'local')['loss_mean']) == pytest.approx(1.1)
