"""The comparison tool on hand-written run directories (tests/experiments/fake_runs.py)."""
import csv
import os
import subprocess
import sys

import pytest

from experiments import compare
from tests.experiments.fake_runs import simple_run, train_records, write_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_table_takes_final_eval_and_median_speed(tmp_path):
  root = str(tmp_path / 'sweep')
  simple_run(root, 'local', 64, 0, 0.9, [1000, 500, 600, 700], memory=2e6)
  simple_run(root, 'local', 128, 0, 0.4, [900, 400, 410, 420])
  simple_run(root, 'full', 64, 0, 0.95, [800, 300, 310, 320])
  simple_run(root, 'full', 64, 1, 0.85, [800, 300, 310, 320])
  rows = compare.table(compare.load_runs([root]))
  assert [(r['kind'], r['length'], r['eval_seq_len'], r['seed']) for r in rows] == [
      ('full', 64, 64, 0), ('full', 64, 64, 1), ('local', 64, 64, 0), ('local', 128, 128, 0)]
  local64 = rows[2]
  assert local64['accuracy'] == 0.9 and local64['perplexity'] == 3.0 and local64['step'] == 100
  assert local64['tokens_per_sec'] == 600  # median of the steps after the first (compile)
  assert local64['peak_memory_bytes'] == 2e6 and local64['compiled_memory_bytes'] is None
  from experiments import plots  # pylint: disable=g-import-not-at-top
  series = plots.series_by_kind(rows, 'accuracy')
  assert series['full'] == [(64, pytest.approx(0.9), 0.85, 0.95)]


def test_compare_cli_keeps_each_eval_at_its_own_length(tmp_path):
  """A run trained at L=64, then `--mode=eval --config.eval_seq_len=128` and
  `--mode=decode`: all three write records at step 600. The L=64 row must keep
  the L=64 eval (0.8234), not the L=128 one written after it (0.6711)."""
  root = str(tmp_path / 'sweep')
  records = train_records([900.0, 500.0, 700.0], every=200, compiled_memory_bytes=3 * 2**20,
                          peak_memory_bytes=600 * 2**20)
  records += [
      dict(step=600, split='eval', loss=0.52, accuracy=0.8234, exact_match=0.2969,
           perplexity=1.68, seq_len=64),
      dict(step=600, split='eval', loss=1.059, accuracy=0.6711, exact_match=0.1094,
           perplexity=2.88, seq_len=128),
      dict(step=600, split='decode', rouge1=30.08, rougeL=30.08, bleu=0.0, exact_match=0.3008,
           num_examples=256),
  ]
  write_run(root, 'full', 64, 0, records, last_step=600)
  out = str(tmp_path / 'report')
  result = subprocess.run([sys.executable, '-m', 'experiments.compare', root, f'--out={out}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  rows = read_csv(os.path.join(out, 'runs.csv'))
  # The run's result at its training length (the bug: 0.6711, the L=128 eval).
  assert [r['accuracy'] for r in rows if r.get('eval_seq_len', r['length']) == '64'] == [
      '0.8234']
  assert [(r['kind'], r['length'], r['eval_seq_len']) for r in rows] == [
      ('full', '64', '64'), ('full', '64', '128')]
  own, longer = rows
  assert (own['step'], own['accuracy'], own['exact_match'], own['loss']) == (
      '600', '0.8234', '0.2969', '0.52')
  assert (longer['step'], longer['accuracy'], longer['exact_match'], longer['loss']) == (
      '600', '0.6711', '0.1094', '1.059')
  # Decode scores (generated text) sit in their own columns, on the row of the
  # length they decoded at, apart from the teacher-forced exact match.
  assert (own['decode_exact_match'], own['decode_rouge1'], own['decode_step']) == (
      '0.3008', '30.08', '600')
  assert longer['decode_exact_match'] == ''
  # Training measurements belong to the training length only (median after the first).
  assert own['tokens_per_sec'] == '600.0' and longer['tokens_per_sec'] == ''
  assert own['compiled_memory_bytes'] == str(float(3 * 2**20))
  assert own['peak_memory_bytes'] == str(float(600 * 2**20))
  # The console table shows the same two rows.
  lines = result.stdout.splitlines()
  assert lines[0].startswith('kind | length | eval_seq_len | seed | step | accuracy')
  assert lines[1].startswith('full | 64 | 64 | 0 | 600 | 0.8234')
  assert lines[2].startswith('full | 64 | 128 | 0 | 600 | 0.6711')
  # The accuracy plot is drawn from the training-length rows only.
  from experiments import plots  # pylint: disable=g-import-not-at-top
  assert plots.series_by_kind(compare.table(compare.load_runs([root])), 'accuracy') == {
      'full': [(64, 0.8234, 0.8234, 0.8234)]}


def test_eval_record_without_seq_len_counts_as_the_training_length(tmp_path):
  root = str(tmp_path)
  write_run(root, 'local', 32, 0, [
      dict(step=100, split='eval', accuracy=0.5),  # written before evals logged seq_len
      dict(step=100, split='eval', accuracy=0.2, seq_len=256),
      dict(step=50, split='eval', accuracy=0.4, seq_len=32),  # an earlier step: not the result
  ])
  rows = compare.table(compare.load_runs([root]))
  assert [(r['eval_seq_len'], r['accuracy']) for r in rows] == [(32, 0.5), (256, 0.2)]


def test_label_is_the_layer_pattern_and_old_configs_load(tmp_path):
  root = str(tmp_path)
  write_run(root, 'pattern', 64, 0, [dict(step=10, split='eval', accuracy=0.7, seq_len=64)],
            attention=dict(kind='full', layer_pattern=['local', 'local', 'full']))
  write_run(root, 'pattern_str', 64, 0, [dict(step=10, split='eval', accuracy=0.6)],
            attention=dict(kind='full', layer_pattern='global_local,full'))
  # A config from before model.kind became model.arch.
  write_run(root, 'old', 64, 0, [dict(step=10, split='eval', accuracy=0.5)],
            attention=dict(kind='hierarchical', layer_pattern=[]), model=dict(kind='lm'))
  rows = compare.table(compare.load_runs([root]))
  assert {r['kind']: r['accuracy'] for r in rows} == {
      'local,local,full': 0.7, 'global_local,full': 0.6, 'hierarchical': 0.5}


def test_mean_span_and_every_eval_metric_are_exported(tmp_path):
  root = str(tmp_path / 'runs')
  records = train_records([100.0, 100.0], mean_span=5.0)
  records[-1]['mean_span'] = 7.25  # the last train record: the final weights' span
  records += [dict(step=20, split='eval', accuracy=0.3, answer_loss=0.125, seq_len=32)]
  write_run(root, 'adaptive_span', 32, 0, records, last_step=20)
  out = str(tmp_path / 'report')
  compare.main([root, f'--out={out}'])
  (row,) = read_csv(os.path.join(out, 'runs.csv'))
  assert row['mean_span'] == '7.25' and row['answer_loss'] == '0.125'
  assert os.path.getsize(os.path.join(out, 'answer_loss_vs_length.png')) > 1000


def test_each_layers_and_heads_span_are_exported_not_plotted(tmp_path):
  root = str(tmp_path / 'runs')
  records = train_records([100.0, 100.0], mean_span=5.0, **{'span/layer_0': 4.0,
                                                            'span/layer_1': 6.0})
  records[-1].update({'mean_span': 7.0, 'span/layer_0': 6.5, 'span/layer_1': 7.5})
  # The run's own eval has the final spans (per head too); an eval at another
  # length (--mode=eval) is a row of its own, without training columns.
  heads = {'span/layer_0': 6.0, 'span/layer_0/head_0': 5.0, 'span/layer_0/head_1': 7.0}
  records += [dict(step=20, split='eval', accuracy=0.3, seq_len=32, **heads),
              dict(step=20, split='eval', accuracy=0.2, seq_len=64)]
  write_run(root, 'adaptive_span', 32, 0, records, last_step=20)
  out = str(tmp_path / 'report')
  compare.main([root, f'--out={out}'])
  own, longer = read_csv(os.path.join(out, 'runs.csv'))
  # The eval record's spans where it has them, else the last train record's.
  assert own['span/layer_0'] == '6.0' and own['span/layer_1'] == '7.5'
  assert own['span/layer_0/head_0'] == '5.0' and own['span/layer_0/head_1'] == '7.0'
  assert own['mean_span'] == '7.0'
  assert longer['eval_seq_len'] == '64' and longer['span/layer_1'] == ''
  plotted = sorted(name for name in os.listdir(out) if name.endswith('_vs_length.png'))
  assert not any('span' in name for name in plotted), plotted
  assert not any(os.path.isdir(os.path.join(out, name)) for name in os.listdir(out))


def test_report_writes_csv_and_plots(tmp_path):
  root = str(tmp_path / 'sweep')
  for kind in ('full', 'local'):
    for length in (32, 64, 128):
      simple_run(root, kind, length, 0, 1.0 - length / 256, [500, 400, 400])
  out = str(tmp_path / 'report')
  rows = compare.report([root], out)
  assert len(rows) == 6
  table = read_csv(os.path.join(out, 'runs.csv'))
  assert {r['kind'] for r in table} == {'full', 'local'}
  for name in ('accuracy_vs_length.png', 'perplexity_vs_length.png',
               'tokens_per_sec_vs_length.png', 'loss_curves.png'):
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 1000, name
  assert not os.path.exists(os.path.join(out, 'memory_vs_length.png'))  # no run logged memory


def test_a_suites_tasks_get_curves_of_their_own(tmp_path):
  from tests.experiments.fake_runs import write_run
  root = str(tmp_path / 'ruler')
  for task in ('niah_single', 'variable_tracking'):
    for kind in ('full', 'local'):
      for length in (128, 256):
        accuracy = 0.9 if task == 'niah_single' else 0.3
        write_run(os.path.join(root, task), kind, length, 0,
                  train_records([100, 100]) + [dict(step=100, split='eval', accuracy=accuracy)],
                  dataset=task)
  out = str(tmp_path / 'report')
  rows = compare.report([root], out)
  assert {(r['dataset'], r['accuracy']) for r in rows} == {('niah_single', 0.9),
                                                          ('variable_tracking', 0.3)}
  for task in ('niah_single', 'variable_tracking'):
    assert os.path.getsize(os.path.join(out, task, 'accuracy_vs_length.png')) > 1000
  assert not os.path.exists(os.path.join(out, 'accuracy_vs_length.png'))


def test_context_curves_are_overlaid_per_training_length(tmp_path):
  from tests.experiments.fake_runs import write_run
  root = str(tmp_path / 'runs')
  for kind in ('full', 'local'):
    workdir = write_run(root, kind, 64, 0, train_records([100, 100]), dataset='longjax_pystdlib')
    os.makedirs(os.path.join(workdir, 'context_eval'))
    with open(os.path.join(workdir, 'context_eval', 'context_curve.csv'), 'w') as f:
      f.write('context,extrapolated,loss,bits_per_byte,ci_low,ci_high,num_targets,'
              'num_documents\n')
      for c, loss in ((16, 2.0), (64, 1.8), (128, 1.9)):
        f.write(f'{c},{int(c > 64)},{loss},{loss / 0.69},{loss - 0.1},{loss + 0.1},100,50\n')
  out = str(tmp_path / 'report')
  compare.report([root], out)
  assert os.path.getsize(os.path.join(out, 'context_curve_L64.png')) > 1000


def test_needle_depth_probes_make_heatmaps_not_rows(tmp_path):
  from tests.experiments.fake_runs import write_run
  root = str(tmp_path / 'niah')
  for kind in ('full', 'local'):
    for length in (128, 256):
      probes = [dict(step=100, split='eval', seq_len=length, needle_depth=d,
                     accuracy=1.0 - d if kind == 'local' else 0.9) for d in (0.0, 0.5, 1.0)]
      records = train_records([100]) + [dict(step=100, split='eval', accuracy=0.7)] + probes
      write_run(root, kind, length, 0, records, dataset='niah_single')
  out = str(tmp_path / 'report')
  rows = compare.report([root], out)
  assert len(rows) == 4 and all(r['accuracy'] == 0.7 for r in rows)  # probes are not rows
  grid = compare.depth_grid(compare.load_runs([root]))
  assert grid['local'][(0.5, 256)] == pytest.approx(0.5) and grid['full'][(1.0, 128)] == 0.9
  for kind in ('full', 'local'):
    assert os.path.getsize(os.path.join(out, f'needle_depth_{kind}.png')) > 1000


def test_a_kinds_context_curve_is_the_mean_over_its_seeds():
  row = lambda c, loss: dict(context=str(c), extrapolated='0', loss=str(loss),
                             ci_low=str(loss - 0.2), ci_high=str(loss + 0.2))
  seeds = [[row(8, 2.0), row(64, 1.6)], [row(8, 2.4), row(64, 1.8), row(512, 1.7)]]
  mean = compare._mean_curve(seeds)  # pylint: disable=protected-access
  assert [r['context'] for r in mean] == ['8', '64']  # the contexts both seeds have
  assert [round(r['loss'], 6) for r in mean] == [2.2, 1.7]
  assert [round(r['ci_high'], 6) for r in mean] == [2.4, 1.9]
