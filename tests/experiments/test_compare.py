"""The comparison tool on hand-written run directories, and the sweep plan."""
import csv
import json
import os

import pytest

from experiments import compare, sweep


def write_run(root, kind, length, seed, final_accuracy, speeds, last_step=100, memory=None):
  workdir = os.path.join(root, kind, f'L{length}_s{seed}')
  os.makedirs(workdir)
  config = dict(seed=seed, seq_len=length, num_train_steps=last_step,
                dataset=dict(name='passkey'), model=dict(attention=dict(kind=kind)))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  records = [dict(step=s, split='train', loss=2.0 / (1 + s), tokens_per_sec=v,
                  **({'peak_memory_bytes': memory} if memory else {}))
             for s, v in zip(range(10, last_step + 1, 10), speeds)]
  records += [dict(step=last_step // 2, split='eval', accuracy=0.1, perplexity=9.0),
              dict(step=last_step, split='eval', accuracy=final_accuracy, perplexity=3.0)]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  return workdir


def test_table_takes_final_eval_and_median_speed(tmp_path):
  root = str(tmp_path / 'sweep')
  write_run(root, 'local', 64, 0, 0.9, [1000, 500, 600, 700], memory=2e6)
  write_run(root, 'local', 128, 0, 0.4, [900, 400, 410, 420])
  write_run(root, 'full', 64, 0, 0.95, [800, 300, 310, 320])
  write_run(root, 'full', 64, 1, 0.85, [800, 300, 310, 320])
  rows = compare.table(compare.load_runs([root]))
  assert [(r['kind'], r['length'], r['seed']) for r in rows] == [
      ('full', 64, 0), ('full', 64, 1), ('local', 64, 0), ('local', 128, 0)]
  local64 = rows[2]
  assert local64['accuracy'] == 0.9 and local64['perplexity'] == 3.0
  assert local64['tokens_per_sec'] == 600  # median of the steps after the first (compile)
  assert local64['peak_memory_bytes'] == 2e6
  series = compare._by_kind(rows, 'accuracy')  # pylint: disable=protected-access
  assert series['full'] == [(64, pytest.approx(0.9), 0.85, 0.95)]


def test_report_writes_csv_and_plots(tmp_path):
  root = str(tmp_path / 'sweep')
  for kind in ('full', 'local'):
    for length in (32, 64, 128):
      write_run(root, kind, length, 0, 1.0 - length / 256, [500, 400, 400])
  out = str(tmp_path / 'report')
  rows = compare.report([root], out)
  assert len(rows) == 6
  with open(os.path.join(out, 'runs.csv')) as f:
    table = list(csv.DictReader(f))
  assert {r['kind'] for r in table} == {'full', 'local'}
  for name in ('accuracy_vs_length.png', 'perplexity_vs_length.png',
               'tokens_per_sec_vs_length.png', 'loss_curves.png'):
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 1000, name
  assert not os.path.exists(os.path.join(out, 'memory_vs_length.png'))  # no run logged memory


def test_sweep_plans_one_workdir_per_combination_and_skips_finished(tmp_path):
  runs = sweep.plan(str(tmp_path), ['full', 'local'], [32, 64], [0, 1])
  assert len(runs) == 8 and len({r.workdir for r in runs}) == 8
  cmd = runs[0].command('configs/passkey.py', 'tiny', ['num_train_steps=5'])
  assert cmd[1:] == ['-m', 'longjax.main', '--config=configs/passkey.py:full,tiny',
                     f'--workdir={runs[0].workdir}', '--config.seq_len=32', '--config.seed=0',
                     '--config.num_train_steps=5']
  done = write_run(str(tmp_path), 'full', 32, 0, 0.5, [1, 1], last_step=20)
  assert runs[0].workdir == done and sweep.is_finished(done)
  unfinished = write_run(str(tmp_path / 'x'), 'local', 32, 0, 0.5, [1, 1], last_step=20)
  with open(os.path.join(unfinished, 'config.json')) as f:
    config = json.load(f)
  config['num_train_steps'] = 40
  with open(os.path.join(unfinished, 'config.json'), 'w') as f:
    json.dump(config, f)
  assert not sweep.is_finished(unfinished)
  assert not sweep.is_finished(str(tmp_path / 'missing'))


def test_sweep_tokens_per_batch_keeps_tokens_per_step_constant():
  runs = sweep.plan('/tmp/sweep', ['local'], [128, 512, 2048], [0])
  batches = [int(next(a for a in run.command('configs/pretrain.py', tokens_per_batch=4096)
                      if a.startswith('--config.batch_size=')).split('=')[1]) for run in runs]
  assert batches == [32, 8, 2]
  assert not any('batch_size' in a for a in runs[0].command('configs/pretrain.py'))
  with pytest.raises(ValueError, match='tokens_per_batch=1000'):
    sweep.batch_for(1000, 128)
