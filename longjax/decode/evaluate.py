"""Decoding evaluation: generate for the eval split, write predictions, score them.

    metrics = decode_and_score(data_config, settings, workdir, model, tokenizer, step=step)
    # -> {'rouge1', 'rouge2', 'rougeL', 'bleu', 'exact_match', 'num_examples', ...}
    # and <workdir>/decode/predictions_step<step>.jsonl: {"source", "prediction", "reference"}

What is generated:
  * seq2seq data (`data_config.seq2seq`): the target of each source,
    by beam search when settings.beam_size > 1, else greedy/sampling;
    the reference is the raw target text.
  * LM data: each row's first document is cut into a prompt and an answer.
    When the weights mark only some targets (the synthetic tasks: the
    passkey, the copied tokens, a recalled value), the answer is the first
    run of weighted targets and the prompt everything before it; when every
    target is weighted (plain text), the answer is the document's last
    min(max_decode_len, half its targets) tokens. The model continues the
    prompt for as many tokens as the longest answer of the batch.

Scores (`score_texts`): ROUGE-1/2/L F-measure with Porter stemming (the
`rouge-score` package; mean over examples, x100), corpus BLEU (`sacrebleu`,
13a tokenisation, 0-100), and exact match (fraction of predictions equal to
their reference).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx

from longjax import data
from longjax import files
from longjax import sharding
from longjax.models import peft
from longjax.decode import generate as generate_lib

PREDICTIONS_DIR = 'decode'
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')


def score_texts(predictions: list[str], references: list[str]) -> dict:
  """ROUGE-1/2/L (mean F, stemmed, x100), corpus BLEU (0-100) and exact match."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  import sacrebleu  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} references.')
  if not predictions:
    return {'num_examples': 0}
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(reference, prediction)  # (target, prediction)
    for name in ROUGE_TYPES:
      totals[name] += scores[name].fmeasure
  metrics = {name: 100.0 * total / len(predictions) for name, total in totals.items()}
  metrics['bleu'] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
  metrics['exact_match'] = float(np.mean([p == r for p, r in zip(predictions, references)]))
  metrics['num_examples'] = len(predictions)
  return metrics


@dataclasses.dataclass
class _Prompt:
  ids: np.ndarray      # prompt tokens (bos first)
  answer: np.ndarray   # reference tokens


def _first_document(row_ids, segment_ids):
  """Length of the row's first document (its first segment)."""
  segment_ids = np.asarray(segment_ids)
  if segment_ids[0] == 0:
    return 0
  return int(np.argmax(np.append(segment_ids, -1) != segment_ids[0]))


def lm_prompt(inputs, targets, weights, segment_ids, max_decode_len: int) -> Optional[_Prompt]:
  """Prompt and answer of one LM row (module docstring); None for a padding row."""
  length = _first_document(inputs, segment_ids)
  weighted = np.asarray(weights[:length]) > 0
  if length == 0 or not weighted.any():
    return None
  if weighted.all():  # plain text: continue the document
    count = min(max_decode_len, length // 2)
    if count == 0:
      return None
    start = length - count
  else:  # the first run of weighted targets is the answer
    start = int(np.argmax(weighted))
    run = np.append(weighted[start:], False)
    count = min(int(np.argmin(run)), max_decode_len)
  # Target j is input j + 1: the prompt ends with input `start`.
  return _Prompt(np.asarray(inputs[:start + 1]), np.asarray(targets[start:start + count]))


def _rows_and_settings(batch, settings, seq2seq):
  """Which rows are real, and the settings (LM: as many tokens as the longest answer)."""
  if seq2seq:
    real = np.asarray(batch['weights']).sum(axis=1) > 0
    return real, None, settings
  prompts = [lm_prompt(batch['inputs'][r], batch['targets'][r], batch['weights'][r],
                       batch['segment_ids'][r], settings.max_decode_len)
             for r in range(len(batch['inputs']))]
  real = np.asarray([p is not None for p in prompts])
  if real.any():
    longest = max(len(p.answer) for p in prompts if p is not None)
    settings = dataclasses.replace(settings, max_decode_len=longest)
  return real, prompts, settings


def decode_rows(graphdef, params, batch, tokenizer, *, settings: generate_lib.DecodeSettings,
                seq2seq: bool, rng=None, mesh=None,
                rules=sharding.DEFAULT_RULES) -> list[dict]:
  """Generates for every real row of an eval batch.

  batch: seq2seq rows with `inputs_text`/`targets_text` (build_eval_iterator
  with with_text=True), or LM rows. Returns one dict per real row: source,
  prediction, reference (text).
  """
  graphdef, params = peft.for_decoding(graphdef, params)
  return _decode_rows(graphdef, params, batch, tokenizer, settings=settings, seq2seq=seq2seq,
                      rng=rng, mesh=mesh, rules=rules)[0]


def _decode_rows(graphdef, params, batch, tokenizer, *, settings, seq2seq, rng, mesh, rules):
  """(rows as decode_rows gives them, number of tokens generated for them)."""
  real, prompts, settings = _rows_and_settings(batch, settings, seq2seq)
  if not real.any():
    return [], 0
  if seq2seq:
    out = generate_lib.generate_seq2seq(graphdef, params, batch['inputs'],
                                        batch['inputs_segment_ids'], settings=settings, rng=rng,
                                        mesh=mesh, rules=rules)
    sources, references = batch['inputs_text'], batch['targets_text']
  else:
    width = max(len(p.ids) for p in prompts if p is not None)
    prompt = np.zeros((len(prompts), width), np.int32)
    lengths = np.ones(len(prompts), np.int32)  # padding rows decode from a lone pad
    for r, p in enumerate(prompts):
      if p is not None:
        prompt[r, :len(p.ids)] = p.ids
        lengths[r] = len(p.ids)
    out = generate_lib.generate(graphdef, params, prompt, lengths, settings=settings, rng=rng,
                                mesh=mesh, rules=rules)
    sources = [tokenizer.decode(p.ids) if p is not None else '' for p in prompts]
    references = [tokenizer.decode(p.answer) if p is not None else '' for p in prompts]
  tokens = np.asarray(out.tokens)
  rows = [dict(source=sources[r], prediction=tokenizer.decode(tokens[r]),
               reference=references[r]) for r in np.flatnonzero(real)]
  return rows, int(np.asarray(out.lengths)[real].sum())


def _split(model):
  """(graphdef, params) of a model, or the pair itself; LoRA adapters merged in
  (models/peft.py: decoding does not run the method Qwix intercepts)."""
  if isinstance(model, tuple):
    graphdef, params = model
  else:
    graphdef, params = nnx.split(model, nnx.Param)
  return peft.for_decoding(graphdef, params)


def _check_single_process():
  if jax.process_count() > 1:
    raise NotImplementedError('decode_and_score runs in a single process; with several hosts '
                              'decode from one process over a mesh of its devices.')


def decode_and_score(data_config: data.DataConfig, settings: generate_lib.DecodeSettings,
                     workdir: str, model, tokenizer, *, step: int = 0, seed: int = 0,
                     num_batches: Optional[int] = None, mesh=None,
                     rules=sharding.DEFAULT_RULES) -> dict:
  """Decodes the eval split, writes the predictions and returns the scores.

  Args:
    data_config: the run's data (the eval split, its length and batch size).
    settings: how to decode.
    workdir: predictions go to <workdir>/decode/predictions_step<step>.jsonl.
    model: a TransformerLM or EncoderDecoder with the parameters to evaluate, or
      its `(graphdef, params)` (e.g. a TrainState's params, placed on `mesh`).
    tokenizer: the run's tokenizer.
    step: the training step, for the file name.
    seed: sampling seed (batch i samples with fold_in(key(seed), i)).
    num_batches: eval batches to decode; None = the whole eval split.
    mesh, rules: decode under the training layouts (see generate.py).
  Returns:
    {'rouge1', 'rouge2', 'rougeL', 'bleu', 'exact_match', 'num_examples',
     'decode_seconds', 'generated_tokens_per_s'} (scores: `score_texts`).
  """
  _check_single_process()
  seq2seq = data_config.seq2seq
  graphdef, params = _split(model)
  batches = data.build_eval_iterator(data_config, tokenizer, with_text=seq2seq, process_index=0,
                                     process_count=1)
  rows, generated = [], 0
  start = time.perf_counter()
  for index, batch in enumerate(batches):
    if num_batches is not None and index >= num_batches:
      break
    rng = jax.random.fold_in(jax.random.key(seed), index)
    decoded, count = _decode_rows(graphdef, params, batch, tokenizer, settings=settings,
                                  seq2seq=seq2seq, rng=rng, mesh=mesh, rules=rules)
    rows.extend(decoded)
    generated += count
  seconds = time.perf_counter() - start

  folder = os.path.join(workdir, PREDICTIONS_DIR)
  os.makedirs(folder, exist_ok=True)
  files.write_atomically(os.path.join(folder, f'predictions_step{int(step)}.jsonl'),
                         ''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows))

  metrics = score_texts([r['prediction'] for r in rows], [r['reference'] for r in rows])
  metrics.update(decode_seconds=seconds, generated_tokens_per_s=generated / max(seconds, 1e-9))
  return metrics


def sample_texts(data_config: data.DataConfig, settings: generate_lib.DecodeSettings, model,
                 tokenizer, batch=None, *, num_examples: int, seed: int = 0, mesh=None,
                 rules=sharding.DEFAULT_RULES) -> list[dict]:
  """Decodes a few eval examples for logging during training.

  Args:
    data_config, settings, tokenizer, mesh, rules: as in `decode_and_score`.
    model: the model, or its `(graphdef, params)`.
    batch: an eval batch (seq2seq: with text); default the eval split's first.
    num_examples: rows decoded from the batch (the first ones).
    seed: sampling seed.
  Returns:
    [{'source', 'prediction', 'reference'}], text (see `format_samples`).
  """
  _check_single_process()
  seq2seq = data_config.seq2seq
  if batch is None:
    batch = next(iter(data.build_eval_iterator(data_config, tokenizer, with_text=seq2seq,
                                               process_index=0, process_count=1)))
  if num_examples <= 0:
    return []
  batch = {key: value[:num_examples] for key, value in batch.items()}
  graphdef, params = _split(model)
  return decode_rows(graphdef, params, batch, tokenizer, settings=settings, seq2seq=seq2seq,
                     rng=jax.random.key(seed), mesh=mesh, rules=rules)


def format_samples(samples: list[dict], max_chars: int = 2000) -> str:
  """Markdown for a TensorBoard text summary; long sources keep their end."""
  def clip(text):
    return text if len(text) <= max_chars else '…' + text[-max_chars:]

  blocks = []
  for i, s in enumerate(samples):
    blocks.append(f'**example {i}**\n\nsource:\n\n    {clip(s["source"])!r}\n\n'
                  f'prediction:\n\n    {clip(s["prediction"])!r}\n\n'
                  f'reference:\n\n    {clip(s["reference"])!r}')
  return '\n\n---\n\n'.join(blocks)
