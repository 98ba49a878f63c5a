"""Context curves on fixed targets: what each extra token of context buys.

    python -m longjax.main --config=... --workdir=DIR --mode=context_eval \
        [--config.context_eval.contexts=16,64,256,1024 --config.context_eval.num_targets=20000]

A curve of loss against the training length mixes what the model learned
with which tokens were scored (a longer window scores later, easier tokens).
Here the scored tokens are fixed: `num_targets` target tokens drawn (seeded)
from every document of the eval split long enough (an equal share of blocks
each, at uniform starts), in blocks of `span` consecutive tokens, each block
at document offset >= C_max (the longest context asked). For every context c the block is scored from a window of
exactly the c tokens before it (plus the block's own earlier tokens): target
j of a block sees c + j tokens, the same at every c but for c. A window never
leaves its document and holds no other (nothing is packed). Loss per target,
bits per byte by the tokenizer's bytes per token, and a bootstrap 95%
interval over documents (resampled with replacement) for each c.

Also the per-position curve: the first seq_len tokens of every document (up
to `num_documents` of them), loss at position p in log-spaced bins
[2^i, 2^(i+1)).

Writes to DIR/context_eval/: context_curve.csv (context, loss,
bits_per_byte, ci_low, ci_high, num_targets, num_documents, extrapolated:
1 where c exceeds the training seq_len), position_curve.csv (position_low,
position_high, loss, bits_per_byte, ci_low, ci_high, num_targets,
num_documents) and context_curve.png, whose extrapolated region is shaded
and never joined to the in-length line. `experiments.compare` overlays the
runs' curves.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from longjax.data import sources
from longjax.train import run_identity
from longjax.train import steps
from longjax.train.setup import build_run

OUT_DIR = 'context_eval'


@dataclasses.dataclass(frozen=True)
class ContextEvalSettings:
  """`config.context_eval`, validated."""
  contexts: tuple[int, ...]
  num_targets: int
  span: int
  min_documents: int
  num_documents: int
  batch_size: int
  bootstrap: int
  seed: int

  @classmethod
  def from_config(cls, config, seq_len: int) -> 'ContextEvalSettings':
    block = config.context_eval
    problems = []
    text = str(block.contexts).strip()
    contexts = ()
    try:
      contexts = tuple(int(c) for c in text.split(',') if c.strip()) if text else \
          tuple(2 ** i for i in range(3, int(math.log2(max(seq_len, 8))) + 1))
    except ValueError:
      problems.append(f'config.context_eval.contexts = {text!r}: write comma-separated token '
                      'counts, e.g. 16,64,256 (empty: powers of two from 8 to seq_len).')
    if contexts and (min(contexts) < 1 or list(contexts) != sorted(set(contexts))):
      problems.append(f'config.context_eval.contexts = {text!r}: increasing counts >= 1.')
    fields = {name: int(block[name]) for name in ('num_targets', 'span', 'min_documents',
                                                   'num_documents', 'batch_size', 'bootstrap')}
    for name, value in fields.items():
      if value < 1:
        problems.append(f'config.context_eval.{name} = {value}: must be >= 1.')
    if problems:
      raise ValueError('Invalid config:\n  ' + '\n  '.join(problems))
    return cls(contexts=contexts, seed=int(config.seed), **fields)


class Targets:
  """The fixed target blocks: document index, start t (>= C_max), for every c."""

  def __init__(self, documents: list, settings: ContextEvalSettings):
    longest = max(settings.contexts)
    span = settings.span
    eligible = [i for i, doc in enumerate(documents) if len(doc) >= longest + span]
    if len(eligible) < settings.min_documents:
      raise ValueError(
          f'context_eval: {len(eligible)} documents of the eval split hold {longest + span} '
          f'tokens (the longest context {longest} + span {span}); '
          f'config.context_eval.min_documents = {settings.min_documents}. Lower '
          'context_eval.contexts or min_documents, or evaluate a longer split.')
    # Spread over the documents: each eligible document gets an equal share of
    # the blocks (the remainder to random ones), at uniform distinct starts.
    rng = np.random.default_rng([settings.seed, 7])
    blocks = max(1, settings.num_targets // span)
    share = np.full(len(eligible), blocks // len(eligible))
    share[rng.choice(len(eligible), blocks % len(eligible), replace=False)] += 1
    document, start = [], []
    for i, count in zip(eligible, share):
      room = len(documents[i]) - span - longest + 1  # starts t in [longest, len - span]
      picks = np.sort(rng.choice(room, min(int(count), room), replace=False))
      document += [i] * len(picks)
      start += list(picks + longest)
    self.document, self.start = np.asarray(document, int), np.asarray(start, int)
    self.span = span

  def windows(self, documents: list, context: int):
    """inputs, targets [blocks, context + span - 1]: the c tokens before each block and the block."""
    inputs, targets = [], []
    for d, t in zip(self.document, self.start):
      doc = documents[d]
      inputs.append(doc[t - context:t + self.span - 1])
      targets.append(doc[t - context + 1:t + self.span])
    return np.stack(inputs).astype(np.int32), np.stack(targets).astype(np.int32)


def bootstrap_interval(sums: np.ndarray, counts: np.ndarray, draws: int, seed: int,
                       level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of sum(sums) / sum(counts) over documents resampled with replacement."""
  rng = np.random.default_rng([seed, 11])
  picks = rng.integers(0, len(sums), size=(draws, len(sums)))
  means = sums[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)
  low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
  return float(low), float(high)


def _per_document(values, documents, weights=None):
  """Per-document sums of values (and of weights or counts), documents of ids."""
  ids, inverse = np.unique(documents, return_inverse=True)
  weights = np.ones_like(values) if weights is None else weights
  return (np.bincount(inverse, values, len(ids)), np.bincount(inverse, weights, len(ids)), ids)


def _curve_row(nll, byte_counts, documents, settings, **extra):
  sums, counts, ids = _per_document(nll, documents)
  byte_sums = _per_document(byte_counts, documents)[0]
  low, high = bootstrap_interval(sums, counts, settings.bootstrap, settings.seed)
  loss = float(sums.sum() / counts.sum())
  return dict(extra, loss=loss, bits_per_byte=float(sums.sum() / math.log(2) / byte_sums.sum()),
              ci_low=low, ci_high=high, num_targets=int(counts.sum()), num_documents=len(ids))


def context_eval(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """The context and position curves of the latest checkpoint in workdir; returns the rows."""
  began = time.perf_counter()
  config = run_identity.evaluation_config(config, workdir, mode='context_eval')
  run = build_run(config, workdir)
  data_config = run.config.data
  if data_config.synthetic or data_config.seq2seq:
    raise ValueError('--mode=context_eval scores documents of a text dataset with a language '
                     f'model; {data_config.dataset.name} is not one (use --mode=eval).')
  settings = ContextEvalSettings.from_config(config, data_config.seq_len)
  step, state = run.restore_latest()
  source = sources.data_source(data_config.dataset.name, data_config.dataset.split_eval,
                               data_dir=data_config.dataset.data_dir)
  key = data_config.dataset.input_key
  documents = [run.tokenizer.encode_to_array(source[i][key]) for i in range(len(source))]
  byte_lengths = np.asarray(run.tokenizer.token_byte_lengths, np.float64)
  score = _scorer(run, state.params)
  targets = Targets(documents, settings)
  rows = []
  for c in settings.contexts:
    inputs, labels = targets.windows(documents, c)
    nll = _batched(score, inputs, labels, settings.batch_size)[:, c - 1:]  # the block's span
    docs = np.repeat(targets.document, settings.span)
    rows.append(_curve_row(nll.reshape(-1), byte_lengths[labels[:, c - 1:]].reshape(-1), docs,
                           settings, context=c, extrapolated=int(c > data_config.seq_len)))
    logging.info('context %d: loss %.4f [%.4f, %.4f]', c, rows[-1]['loss'], rows[-1]['ci_low'],
                 rows[-1]['ci_high'])
  positions = _position_curve(documents, score, byte_lengths, data_config.seq_len, settings)
  out = os.path.join(run.workdir, OUT_DIR)
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    _write_csv(rows, os.path.join(out, 'context_curve.csv'))
    _write_csv(positions, os.path.join(out, 'position_curve.csv'))
    plot_context_curves({str(config.model.attention.kind): rows}, data_config.seq_len,
                        os.path.join(out, 'context_curve.png'))
  line = (f'context_eval done | step {step} | '
          + ', '.join(f'c={r["context"]} {r["loss"]:.4f}' for r in rows)
          + f' | {time.perf_counter() - began:.0f} s | {out}')
  logging.info(line)
  print(line, flush=True)
  return rows


def _scorer(run, params):
  """score(inputs, targets) -> nll [b, l] of the model with params (numpy in, numpy out)."""
  graphdef, settings = run.graphdef, run.step_settings()

  @jax.jit
  def score(params, inputs, targets):
    model = nnx.merge(graphdef, params)
    x, _ = model.hidden(inputs)
    return steps.token_scores(model.embedder, x, targets, settings)[0]

  return lambda inputs, targets: np.asarray(score(params, jnp.asarray(inputs),
                                                  jnp.asarray(targets)))


def _batched(score, inputs, targets, batch_size):
  return np.concatenate([score(inputs[i:i + batch_size], targets[i:i + batch_size])
                         for i in range(0, len(inputs), batch_size)])


def _position_curve(documents, score, byte_lengths, seq_len, settings):
  """Loss at positions 1.. of each document's first seq_len + 1 tokens, in log2 bins."""
  chosen = [d for d in documents if len(d) > seq_len][:settings.num_documents]
  if not chosen:
    return []
  rows = np.stack([d[:seq_len + 1] for d in chosen]).astype(np.int32)
  nll = _batched(score, rows[:, :-1], rows[:, 1:], settings.batch_size)
  position = np.broadcast_to(np.arange(1, seq_len + 1), nll.shape)  # tokens seen
  docs = np.broadcast_to(np.arange(len(chosen))[:, None], nll.shape)
  bytes_ = byte_lengths[rows[:, 1:]]
  out = []
  for i in range(int(math.log2(seq_len)) + 1):
    low, high = 2 ** i, min(2 ** (i + 1), seq_len + 1)
    keep = (position >= low) & (position < high)
    if keep.any():
      out.append(_curve_row(nll[keep], bytes_[keep], docs[keep], settings,
                            position_low=low, position_high=high))
  return out


def _write_csv(rows, path):
  with open(path, 'w', newline='') as f:
    if rows:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


def plot_context_curves(curves: dict, train_length: int, path: str) -> None:
  """Loss against context, one line per label; the region beyond train_length shaded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for index, (label, rows) in enumerate(sorted(curves.items())):
    color = colors[index % len(colors)]
    for extrapolated, style in ((0, '-'), (1, ':')):
      part = [r for r in rows if int(r['extrapolated']) == extrapolated]
      if part:
        c = [int(r['context']) for r in part]
        loss = [float(r['loss']) for r in part]
        low = [float(r['loss']) - float(r['ci_low']) for r in part]
        high = [float(r['ci_high']) - float(r['loss']) for r in part]
        ax.errorbar(c, loss, yerr=[low, high], fmt='o' + style, capsize=3, markersize=3,
                    color=color, label=label if not extrapolated else None)
  if any(int(r['extrapolated']) for rows in curves.values() for r in rows):
    ax.axvspan(train_length, ax.get_xlim()[1], color='0.9', zorder=0,
               label='extrapolation (beyond the training length)')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('context (tokens before the target)')
  ax.set_ylabel('loss (nats per token) on fixed targets')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
