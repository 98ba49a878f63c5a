"""Evaluation during training and of a finished checkpoint, and decoding evaluation.

    summary = Evaluator(run)(state.params)      # eval-split metrics, as train_and_evaluate logs
    summary = evaluate(config, workdir)         # --mode=eval: the latest checkpoint
    scores = decode_eval(config, workdir)       # --mode=decode: generate and score

`evaluate` and `decode_eval` build the model, tokenizer and data from the
workdir's config.json, taking from `config` only what an evaluation may
change (eval_seq_len, the eval split, batches, decoding, mesh: see
run_identity.EVALUATION); any other difference is refused before anything is
built. Every run ends with `log_final_line`: one line, logged and printed.
"""
from __future__ import annotations

import datetime
import itertools
import time
from typing import Mapping, Optional

import jax
import ml_collections
from absl import logging

from longjax import data
from longjax import decode as decode_lib
from longjax import sharding
from longjax.train import metrics
from longjax.train import run_identity
from longjax.train import steps
from longjax.train.batches import Batches
from longjax.train.setup import build_run
from longjax.train.setup import Run


class Evaluator:
  """Summed metrics of params over the first `loop.num_eval_steps` eval batches."""

  def __init__(self, run: Run):
    data_config = run.config.data
    self.seq_len = data_config.eval_seq_len
    self.num_steps = run.config.loop.num_eval_steps  # None: the whole split.
    self.synthetic = data_config.synthetic
    self.needle_depth = data.needle_depth(data_config)  # a fixed depth, or None
    self.dataset = data.build_eval_iterator(data_config, run.tokenizer, seq_len=self.seq_len)
    self.batches = Batches(data_config, run.mesh, run.rules)
    self.mesh, self.rules = run.mesh, run.rules
    self.tokens_per_batch = self.batches.tokens_per_step(self.seq_len)
    self.tokens_per_sec = None  # Of the last call, its first batch (and compile) left out.
    settings = run.step_settings(exact_match=data_config.synthetic)
    self._step = jax.jit(steps.make_eval_step(run.graphdef, settings),
                         in_shardings=(run.shardings.params,
                                       self.batches.shardings(self.seq_len)),
                         out_shardings=run.replicated)

  def __call__(self, params) -> dict[str, float]:
    total, count, start = None, 0, 0.0
    with sharding.axis_rules(self.mesh, self.rules):
      for batch in itertools.islice(self.dataset, self.num_steps):
        total = metrics.add_sums(total, self._step(params, self.batches.global_batch(batch)))
        count += 1
        if count == 1:  # The first call compiles: the rate is of the batches after it.
          jax.block_until_ready(total)
          start = time.perf_counter()
    if total is None:
      raise ValueError('The eval split gave no batches; check config.dataset.split_eval.')
    total = jax.device_get(total)
    if count > 1:
      self.tokens_per_sec = (count - 1) * self.tokens_per_batch / (time.perf_counter() - start)
    summary = metrics.summarize(total, with_bits_per_byte=not self.synthetic)
    summary['seq_len'] = self.seq_len
    if self.needle_depth is not None:
      summary['needle_depth'] = self.needle_depth
    return summary


class Samples:
  """A few eval examples decoded at every evaluation of a seq2seq run.

  The batch is read once (the first rows of the eval split), so the samples
  of successive evaluations can be compared. Single-process runs only.
  """

  def __init__(self, run: Run):
    loop = run.config.loop
    self.enabled = (run.config.data.seq2seq and loop.num_decode_examples > 0 and
                    loop.eval_every_steps > 0 and jax.process_count() == 1)
    self._run = run
    self._batch = None
    if self.enabled:
      self._batch = next(iter(data.build_eval_iterator(
          run.config.data, run.tokenizer, with_text=True, process_index=0, process_count=1)))

  def __call__(self, params) -> str:
    run = self._run
    samples = decode_lib.sample_texts(
        run.config.data, run.config.decode, (run.graphdef, params), run.tokenizer, self._batch,
        num_examples=run.config.loop.num_decode_examples, seed=run.config.loop.seed,
        mesh=run.mesh, rules=run.rules)
    return decode_lib.format_samples(samples)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir` on the eval split.

  The run is the one config.json describes; `config` may change only what
  run_identity.EVALUATION lists: `config.eval_seq_len` (which may exceed the
  training length), the split, the number and size of batches, and the mesh
  (any mesh, whatever mesh trained it). The metrics are logged to
  `metrics.jsonl` with split "eval" at the checkpoint's step, and returned.
  """
  began = time.perf_counter()
  run = build_run(run_identity.evaluation_config(config, workdir, mode='eval'), workdir)
  step, state = run.restore_latest()
  evaluator = Evaluator(run)
  summary = evaluator(state.params)
  with metrics.MetricsWriter(run.workdir, enabled=jax.process_index() == 0) as writer:
    writer.write(step, 'eval', summary)
  logging.info('eval of step %d: %s', step, metrics.format_summary(summary))
  log_final_line('eval done', run.workdir, began=began, steps=f'step {step}', eval_summary=summary,
                 tokens_per_sec=evaluator.tokens_per_sec)
  return summary


def decode_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Generates for the eval split from the latest checkpoint and scores it.

  The run is the one config.json describes; `config` may change only what
  run_identity.EVALUATION lists (decode.*, the split, batches, mesh).
  Seq2seq: greedy or beam search as `config.decode` says, ROUGE-1/2/L and
  BLEU against the references. LM tasks (passkey, ...): the answer after each
  prompt, exact match. Predictions go to `workdir/decode/predictions_step{N}.jsonl`,
  the scores to `metrics.jsonl` (split "decode") and TensorBoard.
  """
  if jax.process_count() > 1:
    raise NotImplementedError('--mode=decode runs on one process; copy the checkpoint and '
                              'decode on a single host.')
  began = time.perf_counter()
  run = build_run(run_identity.evaluation_config(config, workdir, mode='decode'), workdir)
  step, state = run.restore_latest()
  summary = decode_lib.decode_and_score(
      run.config.data, run.config.decode, run.workdir, (run.graphdef, state.params),
      run.tokenizer, step=step, seed=run.config.loop.seed,
      num_batches=run.config.loop.num_eval_steps, mesh=run.mesh, rules=run.rules)
  with metrics.MetricsWriter(run.workdir, enabled=True) as writer:
    writer.write(step, 'decode', summary)
  logging.info('decode of step %d: %s', step, metrics.format_summary(summary))
  scores = ', '.join(f'{name} {summary[name]:.4g}' for name in _DECODE_SCORES
                     if name in summary)
  log_final_line('decode done', run.workdir, began=began, steps=f'step {step}', scores=scores,
                 tokens_per_sec=summary.get('generated_tokens_per_s'), rate='generated tokens/s')
  return summary


_DECODE_SCORES = ('exact_match', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'num_examples')


def log_final_line(headline: str, workdir: str, *, began: float, steps: str,
                   train_loss: Optional[float] = None,
                   eval_summary: Optional[Mapping[str, float]] = None, scores: str = '',
                   tokens_per_sec: Optional[float] = None, rate: str = 'tokens/s') -> str:
  """The one line a run ends with (logged at INFO, and printed by process 0); returns it.

  headline: what ended, e.g. 'train done'; began: time.perf_counter() at the start.
  E.g. `train done | steps 0->20 of 20 |
  train loss 4.7763 | eval loss 4.8516 (seq_len 32) | 9,188 tokens/s | 0:00:14 wall |
  workdir /tmp/tiny`.
  """
  parts = [headline, steps]
  if train_loss is not None:
    parts.append(f'train loss {train_loss:.4f}')
  if eval_summary is not None:
    parts.append(f'eval loss {eval_summary["loss"]:.4f} (seq_len {eval_summary["seq_len"]})')
  if scores:
    parts.append(scores)
  if tokens_per_sec is not None:
    parts.append(f'{tokens_per_sec:,.0f} {rate}')
  parts.append(f'{datetime.timedelta(seconds=round(time.perf_counter() - began))} wall')
  parts.append(f'workdir {workdir}')
  line = ' | '.join(parts)
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)
  return line
