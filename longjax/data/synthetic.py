"""Synthetic long-range diagnostics, generated on the fly at any length.

Each task is a random-access source of LM rows (the format of `lm_examples`,
one example per row, no packing): example i of a split is a function of
(seed, split, i) only, so any process, resumed run or evaluation at
another length regenerates it exactly. `weights` is 1 exactly on the answer
tokens, so the trainer's weighted token accuracy *is* the answer accuracy
(`answer_accuracy` below also gives exact match). Rows are written in
characters so that a decoded row reads as text; with the byte tokenizer every
character is one token (another tokenizer must map each character used to one
token, or the task raises).

A row is built from a sequence S of seq_len + 1 tokens, S[0] = bos:
inputs = S[:-1], targets = S[1:], segment_ids = 1, positions = 0..L-1.
global_mask = 1 on the question: the inputs from the last query mark '?' to
the one that predicts the first answer token. These are the task's global
tokens, which `global_local` attention with model.attention.global_tokens =
'marked' lets attend the whole row, as Longformer makes question tokens
global. The answer's own tokens are marked too only with
config.synthetic.global_answers (until 2026-12-03 they always were: every
scored query of passkey was then a global token, so global_local's passkey
results measured the question path; such results are "question-marked").

passkey (needle in a haystack; Mohtashami & Jaggi 2023, "Landmark Attention")
  S = bos  filler[:d]  '|' k1..kD '|'  filler[d:]  '?' k1..kD
  D = config.synthetic.passkey_digits random digits; the filler is L - 2D - 3
  tokens of random lowercase letters and spaces ('random') or a random stretch
  of the pretraining corpus, longjax_pystdlib ('text'; '|' and '?' in it become
  spaces). d = config.synthetic.passkey_depth x filler length, or uniform
  when it is -1. Weights: the last D targets. Chance: 0.1 per digit.
  Example (L=24, D=3): "␂abc|401|de fghijk lm?401".

associative_recall (multi-query associative recall, MQAR; Arora et al. 2023, "Zoology")
  S = bos  k1 v1 ... kN vN  gap  '?'  q1 a1 ... qQ aQ
  N = config.synthetic.num_pairs distinct keys (lowercase letters), values
  drawn from 36 symbols (digits, capitals), a gap of random punctuation/space
  noise filling the length, then Q = config.synthetic.num_queries distinct keys
  of the N, each followed by its value. Weights: the Q value targets.

selective_copy (Gu & Dao 2023, "Mamba", Section 4.1.1)
  S = bos  region  '?'  c1..cC
  C = config.synthetic.copy_tokens symbols (digits, capitals) at random
  positions of a region of '.' noise, then copied in order. Weights: the C
  copied targets.

Signal at small scale: with exactly this passkey format, a 2-layer d=128
decoder with RoPE (AdamW 3e-3, batch 32, loss on the answer) reached 0.59
answer-token accuracy after 200 steps and 0.76 (exact match 0.15) after 600
steps at L=64, about 2 minutes on 2 CPU cores; the data survey
(notes/data-offline.md) measured 0.35 for learned absolute positions. MQAR
and selective copying rise above chance but need far longer.
"""
from __future__ import annotations

import functools
import string
from typing import Optional

import numpy as np

from longjax.data import sources
from longjax.data import tokenizers
from longjax.data.config import HAYSTACK_TASKS, DataConfig, base_name

SPLIT_CODES = {'train': 0, 'eval': 1}
PRETRAINING_CORPUS = 'longjax_pystdlib'  # Natural passkey filler.

FILLER_CHARS = string.ascii_lowercase + ' '
DIGITS = string.digits
KEY_CHARS = string.ascii_lowercase
VALUE_CHARS = string.digits + string.ascii_uppercase
NOISE_CHARS = ' .,;:-'
BLANK_CHAR = '.'
KEY_MARK = '|'
QUERY_MARK = '?'


class Symbols:
  """Single-token ids of characters under a tokenizer."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer

  @functools.lru_cache(maxsize=None)
  def ids(self, chars: str) -> np.ndarray:
    ids = []
    for char in chars:
      encoded = self.tokenizer.encode(char)
      if len(encoded) != 1:
        raise ValueError(f'Synthetic tasks need {char!r} to be one token; this tokenizer '
                         f'gives {encoded}. Use config.tokenizer.kind = "bytes".')
      ids.append(encoded[0])
    return np.asarray(ids, np.int32)

  def id(self, char: str) -> int:
    return int(self.ids(char)[0])


def row_from_sequence(sequence: np.ndarray, answer_targets: np.ndarray,
                      global_from: Optional[int] = None) -> dict[str, np.ndarray]:
  """An LM row from S (length L + 1) and a boolean mask over the L targets.

  global_from: input positions from this one on are the task's global tokens
  (the question), which global_local attention lets see the whole row.
  """
  length = len(sequence) - 1
  global_mask = np.zeros(length, np.int32)
  if global_from is not None:
    global_mask[global_from:] = 1
  return {
      'inputs': sequence[:-1].astype(np.int32),
      'targets': sequence[1:].astype(np.int32),
      'weights': answer_targets.astype(np.float32),
      'segment_ids': np.ones(length, np.int32),
      'positions': np.arange(length, dtype=np.int32),
      'global_mask': global_mask,
  }


class SyntheticTask:
  """A random-access source: task[i] is the i-th row of a split."""

  name = ''

  def __init__(self, *, seq_len: int, num_examples: int, seed: int, split: str,
               tokenizer: tokenizers.Tokenizer, global_answers: bool = False):
    self.global_answers = global_answers
    self.seq_len = seq_len
    self.num_examples = num_examples
    self.seed = seed
    self.split = split
    self.tokenizer = tokenizer
    self.symbols = Symbols(tokenizer)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
    sequence, answer_targets = self.generate(rng)
    assert len(sequence) == self.seq_len + 1, (len(sequence), self.seq_len)
    row = row_from_sequence(sequence, answer_targets)
    # The question: from the last query mark of the inputs to the input that
    # predicts the first answer token.
    marks = np.flatnonzero(sequence[:-1] == self.symbols.id(QUERY_MARK))
    if len(marks):
      end = len(row['global_mask']) if self.global_answers else \
          int(np.flatnonzero(answer_targets)[0]) + 1
      row['global_mask'][marks[-1]:end] = 1
    return row

  def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _answer_mask(self, num_answers: int) -> np.ndarray:
    mask = np.zeros(self.seq_len, bool)
    mask[self.seq_len - num_answers:] = True
    return mask


class Passkey(SyntheticTask):
  name = 'passkey'

  def __init__(self, *, digits: int, depth: float, filler_tokens: Optional[np.ndarray] = None,
               **kwargs):
    super().__init__(**kwargs)
    self.digits = digits
    self.depth = depth
    self.filler_length = self.seq_len - 2 * digits - 3
    if self.filler_length < 0:
      raise ValueError(f'passkey: seq_len {self.seq_len} is too short for '
                       f'{digits} digits (needs >= {2 * digits + 3}).')
    self.filler_tokens = None
    if filler_tokens is not None:
      # Markers inside natural text would be false needles.
      marks = np.isin(filler_tokens, self.symbols.ids(KEY_MARK + QUERY_MARK))
      self.filler_tokens = np.where(marks, self.symbols.id(' '), filler_tokens).astype(np.int32)
      if len(self.filler_tokens) <= self.filler_length:
        raise ValueError('passkey: the filler corpus is shorter than one example.')

  def filler(self, rng: np.random.Generator) -> np.ndarray:
    if self.filler_tokens is None:
      return rng.choice(self.symbols.ids(FILLER_CHARS), self.filler_length)
    start = rng.integers(0, len(self.filler_tokens) - self.filler_length)
    return self.filler_tokens[start:start + self.filler_length]

  def generate(self, rng):
    key = rng.choice(self.symbols.ids(DIGITS), self.digits)
    filler = self.filler(rng)
    if self.depth == -1:
      split_at = int(rng.integers(0, self.filler_length + 1))
    else:
      split_at = int(round(self.depth * self.filler_length))
    mark, query = self.symbols.id(KEY_MARK), self.symbols.id(QUERY_MARK)
    sequence = np.concatenate([
        [self.tokenizer.bos_id], filler[:split_at], [mark], key, [mark], filler[split_at:],
        [query], key])
    return sequence, self._answer_mask(self.digits)


class AssociativeRecall(SyntheticTask):
  name = 'associative_recall'

  def __init__(self, *, num_pairs: int, num_queries: int, **kwargs):
    super().__init__(**kwargs)
    # DataConfig checked 1 <= num_queries <= num_pairs <= MAX_RECALL_PAIRS (= len(KEY_CHARS)).
    self.num_pairs = num_pairs
    self.num_queries = num_queries
    self.gap_length = self.seq_len - 2 * num_pairs - 2 * num_queries - 1
    if self.gap_length < 0:
      raise ValueError(f'associative_recall: seq_len {self.seq_len} is too short for '
                       f'{num_pairs} pairs and {num_queries} queries.')

  def generate(self, rng):
    keys = rng.choice(self.symbols.ids(KEY_CHARS), self.num_pairs, replace=False)
    values = rng.choice(self.symbols.ids(VALUE_CHARS), self.num_pairs)
    asked = rng.choice(self.num_pairs, self.num_queries, replace=False)
    gap = rng.choice(self.symbols.ids(NOISE_CHARS), self.gap_length)
    pairs = np.stack([keys, values], axis=1).reshape(-1)
    queries = np.stack([keys[asked], values[asked]], axis=1).reshape(-1)
    sequence = np.concatenate([[self.tokenizer.bos_id], pairs, gap,
                               [self.symbols.id(QUERY_MARK)], queries])
    # Targets at the query keys' positions are the values: every other one of the last 2Q.
    answer_targets = np.zeros(self.seq_len, bool)
    answer_targets[self.seq_len - 2 * self.num_queries + 1::2] = True
    return sequence, answer_targets


class SelectiveCopy(SyntheticTask):
  name = 'selective_copy'

  def __init__(self, *, copy_tokens: int, **kwargs):
    super().__init__(**kwargs)
    self.copy_tokens = copy_tokens
    self.region_length = self.seq_len - copy_tokens - 1
    if self.region_length < copy_tokens:
      raise ValueError(f'selective_copy: seq_len {self.seq_len} is too short to copy '
                       f'{copy_tokens} tokens.')

  def generate(self, rng):
    content = rng.choice(self.symbols.ids(VALUE_CHARS), self.copy_tokens)
    region = np.full(self.region_length, self.symbols.id(BLANK_CHAR), np.int32)
    region[np.sort(rng.choice(self.region_length, self.copy_tokens, replace=False))] = content
    sequence = np.concatenate([[self.tokenizer.bos_id], region, [self.symbols.id(QUERY_MARK)],
                               content])
    return sequence, self._answer_mask(self.copy_tokens)


TASKS = {task.name: task for task in (Passkey, AssociativeRecall, SelectiveCopy)}


def filler_tokens(data_config: DataConfig, tokenizer: tokenizers.Tokenizer,
                  split: str) -> Optional[np.ndarray]:
  """Natural passkey filler: the pretraining corpus (train or validation files) as one stream.

  None unless the dataset hides needles in a haystack (passkey, the NIAH and
  variable-tracking tasks) with filler 'text'.
  """
  if (base_name(data_config.dataset.name) not in HAYSTACK_TASKS
      or data_config.synthetic_tasks.filler != 'text'):
    return None
  source = sources.data_source(PRETRAINING_CORPUS, 'train' if split == 'train' else 'validation',
                               data_dir=data_config.dataset.data_dir)
  newline = tokenizer.encode_to_array('\n')
  documents = []
  for index in range(len(source)):
    documents += [tokenizer.encode_to_array(source[index]['text']), newline]
  return np.concatenate(documents)


def make_task(data_config: DataConfig, tokenizer: tokenizers.Tokenizer, *, split: str,
              seq_len: int, filler_tokens: Optional[np.ndarray] = None) -> SyntheticTask:
  """The task `data_config.dataset.name` names, for split 'train' or 'eval'."""
  settings = data_config.synthetic_tasks
  num_examples = settings.num_train_examples if split == 'train' else settings.num_eval_examples
  common = dict(seq_len=seq_len, num_examples=num_examples, seed=data_config.seed, split=split,
                tokenizer=tokenizer, global_answers=settings.global_answers)
  name = base_name(data_config.dataset.name)
  from longjax.data import ruler  # (ruler builds on this module)
  if name in ruler.TASKS:
    if settings.filler == 'text' and name in HAYSTACK_TASKS and filler_tokens is None:
      raise ValueError(f"{name} with config.synthetic.filler = 'text' needs filler_tokens.")
    return ruler.TASKS[name](settings=settings, filler_tokens=filler_tokens
                             if settings.filler == 'text' else None, **common)
  if name == 'passkey':
    if settings.filler == 'text' and filler_tokens is None:
      raise ValueError("passkey with config.synthetic.filler = 'text' needs filler_tokens.")
    return Passkey(digits=settings.passkey_digits, depth=settings.passkey_depth,
                   filler_tokens=filler_tokens if settings.filler == 'text' else None, **common)
  if name == 'associative_recall':
    return AssociativeRecall(num_pairs=settings.num_pairs, num_queries=settings.num_queries,
                             **common)
  if name == 'selective_copy':
    return SelectiveCopy(copy_tokens=settings.copy_tokens, **common)
  raise ValueError(f'Unknown synthetic task {name!r}; known: {sorted(TASKS) + sorted(ruler.TASKS)}.')


def answer_accuracy(predictions: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[float, float]:
  """(answer-token accuracy, exact match) of predicted next tokens [B, L] on a batch.

  Rows without answers (eval padding) count in neither.
  """
  weights = batch['weights'] > 0
  correct = (predictions == batch['targets']) & weights
  token_accuracy = correct.sum() / max(int(weights.sum()), 1)
  has_answer = weights.any(axis=1)
  exact = (correct.sum(axis=1) == weights.sum(axis=1)) & has_answer
  return float(token_accuracy), float(exact.sum() / max(int(has_answer.sum()), 1))
