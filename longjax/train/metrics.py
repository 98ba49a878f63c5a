"""Metric writers, metric summaries, the progress line, memory use and profiles.

Every train and eval summary goes to (process 0 only):
  - `<workdir>/metrics.jsonl`: one JSON object a line, the file experiments read:
      {"step": 200, "split": "train", "loss": 1.93, "accuracy": 0.51,
       "perplexity": 6.9, "learning_rate": 0.0028, "tokens_per_sec": 51234.0, ...}
    `loss` is the mean cross-entropy in nats per target token (without label
    smoothing, z-loss or the span penalty), `bits_per_byte` is there for text
    data, `mean_span` for adaptive-span models (the mean learned span in
    tokens) with `span/layer_<i>` (layer i's mean over heads) and, in eval
    records, `span/layer_<i>/head_<h>`, `exact_match` (every answer token
    right) for the synthetic tasks' eval.
  - TensorBoard event files in `<workdir>` (tags `train/loss`, `eval/loss`, ...).

Both are clu `MetricWriter`s behind one `MultiWriter`. clu 0.0.12 imports its
TensorFlow summary writer when `clu.metric_writers` is imported, and longjax
has no TensorFlow (tfds reads array_record through grain), so
`_clu_metric_writers()` stands in a module that raises only when that writer
is constructed; the event files are written with tensorboardX instead.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import resource
import sys
import time
import types
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np


def _clu_metric_writers():
  name = 'clu.metric_writers.summary_writer'
  if importlib.util.find_spec('tensorflow') is None and name not in sys.modules:
    stub = types.ModuleType(name)

    class SummaryWriter:  # pylint: disable=too-few-public-methods

      def __init__(self, *args, **kwargs):
        del args, kwargs
        raise ImportError('clu.metric_writers.SummaryWriter needs TensorFlow; longjax writes '
                          'TensorBoard files with longjax.train.metrics.TensorBoardWriter.')

    stub.SummaryWriter = SummaryWriter
    sys.modules[name] = stub
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers


metric_writers = _clu_metric_writers()
interface = metric_writers.interface


class _ScalarWriter(interface.MetricWriter):
  """A clu MetricWriter for which every kind of summary is a no-op until overridden.

  longjax logs scalars, texts and hyper-parameters, never images, audio,
  videos, histograms or raw summaries.
  """

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_texts(self, step, texts):
    del step, texts

  def write_hparams(self, hparams):
    del hparams

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def flush(self):
    pass

  def close(self):
    pass


class TensorBoardWriter(_ScalarWriter):
  """Scalars, texts and hyper-parameters as TensorBoard event files (tensorboardX)."""

  def __init__(self, logdir: str):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._writer.add_text('hparams', json.dumps(dict(hparams), indent=2, default=str), 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter(_ScalarWriter):
  """Scalars named '<split>/<metric>' as one JSON object per (step, split) and line.

  The split is the name's first part: a metric may hold '/' ('span/layer_0').
  """

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    records: dict[str, dict[str, Any]] = {}
    for key, value in scalars.items():
      split, _, metric = key.partition('/')
      if not metric:  # a bare name: a train metric
        split, metric = 'train', split
      records.setdefault(split, {})[metric] = _json_number(value)
    for split, values in records.items():
      self._file.write(json.dumps({'step': int(step), 'split': split, **values}) + '\n')
    self._file.flush()

  def truncate_after(self, step: int):
    """Drops records of steps after `step`: a resumed run writes them again.

    A torn last line (the process was killed while writing it) is dropped with
    a warning. The kept records replace the file through a temporary file and a
    rename, so a kill during the rewrite leaves the old history whole.
    """
    self._file.close()
    try:
      kept = [line for line, record in self._records() if record['step'] <= step]
      _replace_atomically(self.path, ''.join(kept))
    finally:
      self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def start_fresh(self) -> Optional[str]:
    """A run starting from step 0 gets an empty file; an older history is moved aside.

    Returns the path it was moved to (metrics.jsonl.previous-N), or None.
    """
    if not os.path.getsize(self.path):
      return None
    self._file.close()
    index = 1
    while os.path.exists(f'{self.path}.previous-{index}'):
      index += 1
    moved = f'{self.path}.previous-{index}'
    os.replace(self.path, moved)
    self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    return moved

  def _records(self):
    """(line, record) of every complete record; a torn last line is skipped."""
    with open(self.path, encoding='utf-8') as f:
      lines = [line for line in f if line.strip()]
    for number, line in enumerate(lines, start=1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        if number == len(lines):
          logging.warning('%s: dropped its torn last line (a write was interrupted): %r',
                          self.path, line[:200])
          return
        raise ValueError(f'{self.path}: line {number} is not a JSON record ({line[:200]!r}); '
                         f'the file is damaged: move it aside to resume.') from None
      yield (line if line.endswith('\n') else line + '\n'), record

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _replace_atomically(path: str, text: str):
  """Writes `text` to `path` through a synced temporary file and a rename."""
  temporary = f'{path}.tmp'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def _json_number(value) -> Any:
  value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # 'nan' / 'inf': JSON has no such numbers.
  return value


class MetricsWriter:
  """metrics.jsonl and TensorBoard on process 0; nothing on the other processes."""

  def __init__(self, workdir: str, *, enabled: bool):
    self.enabled = enabled
    self._jsonl = None
    writers = []
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))
      writers = [self._jsonl, TensorBoardWriter(workdir)]
    self._writer = metric_writers.MultiWriter(writers)

  def write(self, step: int, split: str, values: Mapping[str, Any]):
    self._writer.write_scalars(step, {f'{split}/{key}': value for key, value in values.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    """Text (decoded samples) to TensorBoard; metrics.jsonl keeps numbers only."""
    self._writer.write_texts(step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]):
    """The config, as text in TensorBoard (metrics.jsonl keeps metrics only)."""
    self._writer.write_hparams(hparams)

  def truncate_after(self, step: int):
    if self._jsonl is not None:
      self._jsonl.truncate_after(step)

  def start_fresh(self):
    """A run from step 0: an earlier run's metrics.jsonl is moved aside (logged)."""
    moved = self._jsonl.start_fresh() if self._jsonl is not None else None
    if moved:
      logging.warning('Starting from step 0: the earlier metrics.jsonl was moved to %s.', moved)

  def close(self):
    self._writer.flush()
    self._writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


# Summaries (host side: numpy on metrics already fetched from the devices) ---

SUMMED_TRAIN_METRICS = ('nll_sum', 'weight_sum', 'correct_sum', 'byte_sum')
# Metrics that are properties of the weights, not of the tokens: kept, not
# summed, when the sums of several batches (or micro-batches) are added.
KEPT_METRICS = ('mean_span',)
# Adaptive span's learned spans in tokens, also kept: `span/layer_<i>` (the
# mean over the layer's heads; train and eval records) and
# `span/layer_<i>/head_<h>` (eval records).
SPAN_PREFIX = 'span/'
HEAD_MARK = '/head_'


def span_metrics(head_spans: Mapping[int, Any]) -> dict:
  """{layer index: spans [heads]} -> {'span/layer_<i>': mean, 'span/layer_<i>/head_<h>': span}."""
  out = {}
  for layer, spans in sorted(head_spans.items()):
    spans = spans.astype('float32')
    out[f'{SPAN_PREFIX}layer_{layer}'] = spans.mean()
    for head in range(spans.shape[0]):
      out[f'{SPAN_PREFIX}layer_{layer}{HEAD_MARK}{head}'] = spans[head]
  return out


def is_kept(key: str) -> bool:
  """Whether a metric is a property of the weights (kept, not summed)."""
  return key in KEPT_METRICS or key.startswith(SPAN_PREFIX)


def summarize(sums: Mapping[str, Any], *, with_bits_per_byte: bool) -> dict[str, float]:
  """loss, perplexity, accuracy (and bits_per_byte, exact_match, mean_span) from sums.

  `sums` holds what the train and eval steps return: `nll_sum` (nats),
  `weight_sum` (target tokens), `correct_sum`, `byte_sum`, and optionally
  `exact_sum` / `row_sum` and `mean_span`.
  """
  weight = max(float(sums['weight_sum']), 1e-9)
  loss = float(sums['nll_sum']) / weight
  out = {
      'loss': loss,
      'perplexity': math.exp(loss) if loss < 700 else float('inf'),  # exp overflows past 709.
      'accuracy': float(sums['correct_sum']) / weight,
  }
  if with_bits_per_byte and float(sums['byte_sum']) > 0:
    # Bits per byte = total nats / (ln 2 * UTF-8 bytes of the targets).
    out['bits_per_byte'] = float(sums['nll_sum']) / (math.log(2) * float(sums['byte_sum']))
  if 'row_sum' in sums:
    out['exact_match'] = float(sums['exact_sum']) / max(float(sums['row_sum']), 1e-9)
  if 'mean_span' in sums:
    out['mean_span'] = float(sums['mean_span'])
  out.update({key: float(value) for key, value in _span_items(sums)})
  return out


def _layer_index(key: str) -> tuple:
  """'span/layer_10/head_2' -> (10, 2): numeric order, not string order."""
  return tuple(int(part.rsplit('_', 1)[1]) for part in key[len(SPAN_PREFIX):].split('/'))


def _span_items(sums: Mapping[str, Any]) -> list:
  return sorted(((k, v) for k, v in sums.items() if k.startswith(SPAN_PREFIX)),
                key=lambda item: _layer_index(item[0]))


def add_sums(total: Optional[Mapping[str, Any]], sums: Mapping[str, Any]) -> dict:
  """total + sums, key by key, with the KEPT_METRICS taken from `sums`; total None: sums.

  Any array type: numpy on the host, jax arrays, or tracers inside a step.
  """
  if total is None:
    return dict(sums)
  return {key: value if is_kept(key) else total[key] + value
          for key, value in sums.items()}


def train_summary(step_metrics: Sequence[Mapping[str, Any]], *,
                  with_bits_per_byte: bool) -> dict[str, float]:
  """Summary of the train steps since the last log: summed over steps, rates averaged."""
  total = None
  for metrics in step_metrics:
    # Added in float64 on the host: hundreds of steps of float32 sums.
    # Spans: each layer's mean (the per-head spans are in the eval records).
    total = add_sums(total, {key: np.asarray(value, np.float64) for key, value in metrics.items()
                             if key in SUMMED_TRAIN_METRICS + KEPT_METRICS
                             or (key.startswith(SPAN_PREFIX) and HEAD_MARK not in key)})
  out = summarize(total, with_bits_per_byte=with_bits_per_byte)
  out['learning_rate'] = float(step_metrics[-1]['learning_rate'])
  out['grad_norm'] = float(np.mean([float(m['grad_norm']) for m in step_metrics]))
  return out


class Progress:
  """Steps/s, tokens/s and ETA between two log points, and the progress line."""

  def __init__(self, *, total_steps: int, tokens_per_step: int, start_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._step = start_step
    self._time = time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    """Rates since the previous call; call after the step's results were fetched."""
    now = time.perf_counter()
    steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return {'steps_per_sec': steps_per_sec,
            'tokens_per_sec': steps_per_sec * self.tokens_per_step}

  def line(self, step: int, loss: float, rates: Mapping[str, float]) -> str:
    remaining = (self.total_steps - step) / max(rates['steps_per_sec'], 1e-9)
    eta = datetime.timedelta(seconds=round(remaining))
    return (f'step {step}/{self.total_steps} | loss {loss:.4f} | '
            f'{rates["steps_per_sec"]:.2f} steps/s | {rates["tokens_per_sec"]:,.0f} tokens/s | '
            f'ETA {eta}')


def format_summary(summary: Mapping[str, Any]) -> str:
  """A summary as one JSON line for the log, floats rounded to 4 digits."""
  return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


# Memory and profiles --------------------------------------------------------


def log_memory(compiled) -> Optional[int]:
  """Logs XLA's memory plan of the compiled train step; returns its bytes per device."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  mib = lambda n: n / 2**20
  logging.info(
      'Train step compiled. Memory per device: arguments %.1f MiB, outputs %.1f MiB, '
      'temporaries %.1f MiB, donated and reused %.1f MiB, generated code %.1f MiB.',
      mib(stats.argument_size_in_bytes), mib(stats.output_size_in_bytes),
      mib(stats.temp_size_in_bytes), mib(stats.alias_size_in_bytes),
      mib(stats.generated_code_size_in_bytes))
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def memory_use(compiled_bytes: Optional[int]) -> dict[str, float]:
  """Memory for metrics.jsonl: XLA's plan per device, and the measured peak.

  peak_memory_bytes is the accelerator's peak bytes in use where the runtime
  reports it (GPU, TPU), else this process's peak resident memory (CPU).
  """
  out = {} if compiled_bytes is None else {'compiled_memory_bytes': float(compiled_bytes)}
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_memory_bytes'] = float(stats['peak_bytes_in_use'])
  else:
    out['peak_memory_bytes'] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return out


class Profiler:
  """Traces `profile_steps` steps, from a run's second step on, into `logdir`.

  The first step of a run is skipped: it pays for warm-up. Open the trace with
  TensorBoard's profile plugin or Perfetto (`*.trace.json.gz`).
  """

  def __init__(self, profile_steps: int, logdir: str):
    self.profile_steps = profile_steps
    self.logdir = logdir
    self.tracing = False

  def before(self, step: int, start_step: int, state):
    first = start_step + 2
    if self.profile_steps and step == first:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
    elif self.tracing and step == first + self.profile_steps:
      jax.block_until_ready(state)
      self._stop()

  def _stop(self):
    jax.profiler.stop_trace()
    self.tracing = False
    logging.info('Profile of %d steps written to %s.', self.profile_steps, self.logdir)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self.tracing:
      self._stop()
