"""A RULER-style synthetic suite (Hsieh et al. 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?"), in characters.

RULER's tasks at a scale a small model trained from scratch can be taught:
its sentences ("One of the special magic numbers for {key} is: {value}.")
become marked records, words become fixed-width letter strings, and with the
byte tokenizer every character is one token. Each task is a `SyntheticTask`
(synthetic.py): example i of a split is a function of (seed, split, i) only,
`weights` is 1 exactly on the answer tokens, and the answer is recoverable
from the inputs alone by the rule written below. The question (from the
query mark '?' to the input that predicts the first answer token) is the
row's global_mask; answer tokens are marked too only with
`config.synthetic.global_answers` (results then are "question-marked").

Pieces (K = KEY_LEN lowercase letters, V = VALUE_LEN digits, W = WORD_LEN
lowercase letters; the haystack is random lowercase letters and spaces, or a
stretch of the pretraining corpus with `config.synthetic.filler = 'text'`,
its '|', '=', ';' and '?' made spaces):

    needle  = '|' key '=' value '|'

niah_single (RULER S-NIAH): one needle at depth d in the haystack;
  S = bos  hay[:d] needle hay[d:]  '?' key '='  value
  d = config.synthetic.needle_depth x haystack length, uniform when -1.
  Answer: the value (V targets).
niah_multikey (MK-NIAH): num_needles needles of distinct keys, the asked one
  at depth d, the others (distractors) at uniform depths; asked as above.
niah_multivalue (MV-NIAH): num_values needles of one key at uniform depths;
  S = ... '?' key '='  v1 v2 ... (the values in the order they appear).
niah_multiquery (MQ-NIAH): num_needles needles of distinct keys; num_queries
  of them asked, in random order:
  S = ... '?' k1 '=' v1 ';' k2 '=' v2 ... ; answers: the values only.
variable_tracking (VT): num_chains chains of `hops` assignments, chain c
  '|' x1 '=' value_c '|', '|' x2 '=' x1 '|', ..., '|' x_hops '=' x_{hops-1} '|'
  (distinct K-letter names; the statements of all chains at uniform depths,
  each chain in order); asked for one chain's value:
  S = ... '?' value_c '='  x1 x2 ... x_hops.
common_words (CWE): a haystack of W-letter words separated by spaces:
  num_common words appear `word_repeats` times each, every other word once,
  shuffled; S = bos words '?' c1 c2 ... (the common words in the order of
  their first appearance).
frequent_words (FWE): the words are drawn from a Zipf distribution (exponent
  ZIPF_EXPONENT) over a vocabulary of distinct words;
  S = bos words '?' f1 .. f_k, the num_frequent most frequent words, most
  frequent first, ties broken by first appearance.

Chance is 0.1 per digit and 1/26 per letter.
"""
from __future__ import annotations

import string
from typing import Optional

import numpy as np

from longjax.data import synthetic

KEY_LEN = 3
VALUE_LEN = 4
WORD_LEN = 4
ZIPF_EXPONENT = 1.5
QUESTION = synthetic.QUERY_MARK
MARK, EQUALS, SEPARATOR = synthetic.KEY_MARK, '=', ';'
SPECIAL = MARK + EQUALS + SEPARATOR + QUESTION


class RulerTask(synthetic.SyntheticTask):
  """A RULER task: its sequence is bos + body + question + answer, answer weighted."""

  def __init__(self, *, settings, filler_tokens: Optional[np.ndarray] = None, **kwargs):
    super().__init__(**kwargs)
    self.settings = settings
    self.filler_tokens = None
    if filler_tokens is not None:
      special = np.isin(filler_tokens, self.symbols.ids(SPECIAL))
      self.filler_tokens = np.where(special, self.symbols.id(' '), filler_tokens).astype(np.int32)

  # Pieces -------------------------------------------------------------------

  def ids(self, chars: str) -> list:
    return list(self.symbols.ids(chars)) if chars else []

  def letters(self, rng, count: int, width: int) -> list:
    """`count` distinct strings of `width` lowercase letters."""
    seen, out = set(), []
    while len(out) < count:
      word = ''.join(rng.choice(list(string.ascii_lowercase), width))
      if word not in seen:
        seen.add(word)
        out.append(word)
    return out

  def digits(self, rng, count: int) -> list:
    """`count` distinct VALUE_LEN-digit strings."""
    values = rng.choice(10 ** VALUE_LEN, count, replace=False)
    return [str(v).zfill(VALUE_LEN) for v in values]

  def haystack(self, rng, length: int) -> list:
    if length < 0:
      raise ValueError(f'{self.name}: seq_len {self.seq_len} is too short for its needles and '
                       f'question (needs {self.seq_len - length} tokens or more).')
    if self.filler_tokens is None:
      return list(rng.choice(self.symbols.ids(synthetic.FILLER_CHARS), length))
    if len(self.filler_tokens) <= length:
      raise ValueError(f'{self.name}: the filler corpus is shorter than one example.')
    start = int(rng.integers(0, len(self.filler_tokens) - length))
    return list(self.filler_tokens[start:start + length])

  def insert(self, rng, pieces: list, depth: float = -1) -> list:
    """A haystack filling the row with `pieces` (id lists) inserted in order at
    uniform depths; with depth != -1, pieces[0] at that fraction of the haystack."""
    used = sum(map(len, pieces)) + 1 + self.question_length + self.answer_length
    hay = self.haystack(rng, self.seq_len + 1 - used)
    if depth == -1:
      cuts = np.sort(rng.integers(0, len(hay) + 1, len(pieces)))
    else:
      first = int(round(depth * len(hay)))
      cuts = np.sort(np.concatenate([[first], rng.integers(0, len(hay) + 1, len(pieces) - 1)]))
      at = int(np.searchsorted(cuts, first))  # pieces[0] takes the cut at `first`
      pieces = pieces[1:at + 1] + [pieces[0]] + pieces[at + 1:]
    body, last = [], 0
    for cut, piece in zip(cuts, pieces):
      body += hay[last:cut] + piece
      last = cut
    return body + hay[last:]

  def row(self, body: list, question: str, answer: list, weighted: Optional[list] = None):
    """S = bos body question answer; weights on `weighted` (default: every answer token)."""
    question_ids = self.ids(question)
    sequence = np.asarray([self.tokenizer.bos_id] + body + question_ids + answer, np.int32)
    weights = np.zeros(self.seq_len, bool)
    start = self.seq_len - len(answer)
    if weighted is None:
      weights[start:] = True
    else:
      weights[start + np.asarray(weighted, int)] = True
    return sequence, weights

  @property
  def question_length(self) -> int:
    raise NotImplementedError

  @property
  def answer_length(self) -> int:
    raise NotImplementedError

  def needle(self, key: str, value: str) -> list:
    return self.ids(MARK + key + EQUALS + value + MARK)


class NiahSingle(RulerTask):
  name = 'niah_single'
  question_length = 1 + KEY_LEN + 1
  answer_length = VALUE_LEN

  def generate(self, rng):
    key, = self.letters(rng, 1, KEY_LEN)
    value, = self.digits(rng, 1)
    body = self.insert(rng, [self.needle(key, value)], self.settings.needle_depth)
    return self.row(body, QUESTION + key + EQUALS, self.ids(value))


class NiahMultikey(RulerTask):
  name = 'niah_multikey'
  question_length = 1 + KEY_LEN + 1
  answer_length = VALUE_LEN

  def generate(self, rng):
    n = self.settings.num_needles
    keys, values = self.letters(rng, n, KEY_LEN), self.digits(rng, n)
    needles = [self.needle(k, v) for k, v in zip(keys, values)]  # keys[0] is asked
    body = self.insert(rng, needles, self.settings.needle_depth)
    return self.row(body, QUESTION + keys[0] + EQUALS, self.ids(values[0]))


class NiahMultivalue(RulerTask):
  name = 'niah_multivalue'
  question_length = 1 + KEY_LEN + 1

  @property
  def answer_length(self):
    return self.settings.num_values * VALUE_LEN

  def generate(self, rng):
    key, = self.letters(rng, 1, KEY_LEN)
    values = self.digits(rng, self.settings.num_values)
    body = self.insert(rng, [self.needle(key, v) for v in values])
    return self.row(body, QUESTION + key + EQUALS, self.ids(''.join(values)))


class NiahMultiquery(RulerTask):
  name = 'niah_multiquery'
  question_length = 1

  @property
  def answer_length(self):  # k1 '=' v1 ';' k2 '=' v2 ... (the queries within the answer)
    q = self.settings.num_queries
    return q * (KEY_LEN + 1 + VALUE_LEN) + (q - 1)

  def generate(self, rng):
    n, q = self.settings.num_needles, self.settings.num_queries
    keys, values = self.letters(rng, n, KEY_LEN), self.digits(rng, n)
    body = self.insert(rng, [self.needle(k, v) for k, v in zip(keys, values)])
    asked = rng.choice(n, q, replace=False)
    text = SEPARATOR.join(keys[i] + EQUALS + values[i] for i in asked)
    stride = KEY_LEN + 1 + VALUE_LEN + 1
    weighted = [j * stride + KEY_LEN + 1 + d for j in range(q) for d in range(VALUE_LEN)]
    return self.row(body, QUESTION, self.ids(text), weighted)


class VariableTracking(RulerTask):
  name = 'variable_tracking'
  question_length = 1 + VALUE_LEN + 1

  @property
  def answer_length(self):
    return self.settings.hops * KEY_LEN

  def generate(self, rng):
    chains, hops = self.settings.num_chains, self.settings.hops
    names = self.letters(rng, chains * hops, KEY_LEN)
    values = self.digits(rng, chains)
    statements = []  # (chain, hop, ids)
    for c in range(chains):
      chain = names[c * hops:(c + 1) * hops]
      for h, name in enumerate(chain):
        statements.append((c, self.needle(name, values[c] if h == 0 else chain[h - 1])))
    # Interleave the chains at random, each in its own order.
    order = rng.permutation([c for c, _ in statements])
    queues = {c: [ids for cc, ids in statements if cc == c] for c in range(chains)}
    pieces = [queues[c].pop(0) for c in order]
    body = self.insert(rng, pieces)
    asked = int(rng.integers(chains))
    answer = ''.join(names[asked * hops:(asked + 1) * hops])
    return self.row(body, QUESTION + values[asked] + EQUALS, self.ids(answer))


class _Words(RulerTask):
  """A haystack of words: fills the row with `count` W-letter words and spaces."""
  question_length = 1

  def word_count(self) -> int:
    room = self.seq_len + 1 - 1 - self.question_length - self.answer_length
    count = (room + 1) // (WORD_LEN + 1)  # words separated by single spaces
    if count < self.min_words():
      raise ValueError(f'{self.name}: seq_len {self.seq_len} holds {count} words; it needs '
                       f'{self.min_words()} or more.')
    return count

  def words_row(self, words: list, answer: list):
    text = ' '.join(words)
    room = self.seq_len + 1 - 1 - self.question_length - self.answer_length
    text += ' ' * (room - len(text))  # pad to the exact length
    return self.row(self.ids(text), QUESTION, self.ids(''.join(answer)))


class CommonWords(_Words):
  name = 'common_words'

  @property
  def answer_length(self):
    return self.settings.num_common * WORD_LEN

  def min_words(self):
    return self.settings.num_common * self.settings.word_repeats

  def generate(self, rng):
    count, common = self.word_count(), self.settings.num_common
    repeats = self.settings.word_repeats
    rare = count - common * repeats
    vocabulary = self.letters(rng, common + rare, WORD_LEN)
    words = vocabulary[:common] * repeats + vocabulary[common:]
    words = [words[i] for i in rng.permutation(len(words))]
    first = sorted(vocabulary[:common], key=words.index)
    return self.words_row(words, first)


class FrequentWords(_Words):
  name = 'frequent_words'

  @property
  def answer_length(self):
    return self.settings.num_frequent * WORD_LEN

  def min_words(self):
    return self.settings.num_frequent

  def generate(self, rng):
    count, k = self.word_count(), self.settings.num_frequent
    vocabulary = self.letters(rng, max(count, k), WORD_LEN)
    ranks = np.arange(1, len(vocabulary) + 1)
    p = ranks ** -ZIPF_EXPONENT
    words = [vocabulary[i] for i in rng.choice(len(vocabulary), count, p=p / p.sum())]
    return self.words_row(words, most_frequent(words, k))


def most_frequent(words: list, k: int) -> list:
  """The k most frequent words, most frequent first, ties by first appearance."""
  counts, first = {}, {}
  for i, word in enumerate(words):
    counts[word] = counts.get(word, 0) + 1
    first.setdefault(word, i)
  return sorted(counts, key=lambda w: (-counts[w], first[w]))[:k]


TASKS = {task.name: task for task in (NiahSingle, NiahMultikey, NiahMultivalue, NiahMultiquery,
                                      VariableTracking, CommonWords, FrequentWords)}
