"""The comparison plots: plain length labels, and a memory plot that says what it measured."""
import os

import matplotlib
import matplotlib.pyplot as plt

from experiments import compare, plots
from tests.experiments.fake_runs import train_records, write_run

matplotlib.use('Agg')  # No display; plots.* selects it too.


def test_lengths_are_labelled_in_plain_numbers_on_a_log2_axis():
  assert [plots.length_label(n) for n in (32, 64, 512, 1024, 1536, 4096, 16384, 2**20)] == [
      '32', '64', '512', '1k', '1.5k', '4k', '16k', '1M']
  fig, ax = plt.subplots()
  ax.plot([32, 64, 1024, 4096, 16384], [1, 2, 3, 4, 5])
  plots.format_length_axis(ax, [1024, 32, 16384, 64, 4096])
  fig.canvas.draw()
  assert ax.get_xscale() == 'log'
  assert [t.get_text() for t in ax.get_xticklabels()] == ['32', '64', '1k', '4k', '16k']
  assert not ax.get_xticks(minor=True).size  # no 2^x minor ticks
  plt.close(fig)


def _sweep(root, **memory):
  for kind, scale in (('full', 2), ('local', 1)):
    for length in (512, 1024, 4096):
      write_run(root, kind, length, 0,
                train_records([100.0, 90.0], **{k: v * scale * length for k, v in memory.items()})
                + [dict(step=20, split='eval', loss=1.0, seq_len=length)], last_step=20)


def test_memory_plot_uses_xla_memory_analysis_when_logged(tmp_path):
  root = str(tmp_path / 'runs')
  _sweep(root, compiled_memory_bytes=1000.0, peak_memory_bytes=10**6)
  rows = compare.report([root], str(tmp_path / 'report'))
  memory = plots.memory_plot(rows)
  assert memory.metric == 'compiled_memory_bytes'
  assert 'MiB per device (XLA memory analysis)' in memory.ylabel
  assert os.path.getsize(tmp_path / 'report' / 'memory_vs_length.png') > 1000


def test_memory_plot_of_peak_rss_says_it_includes_compilation(tmp_path):
  root = str(tmp_path / 'runs')
  _sweep(root, peak_memory_bytes=10**6)
  rows = compare.report([root], str(tmp_path / 'report'))
  memory = plots.memory_plot(rows)
  assert memory.metric == 'peak_memory_bytes'
  assert 'peak process RSS (CPU; includes compilation)' in memory.ylabel
  assert os.path.getsize(tmp_path / 'report' / 'memory_vs_length.png') > 1000
