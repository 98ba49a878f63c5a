"""Tokenizers: UTF-8 bytes (the default) and SentencePiece, with the same special ids.

Both reserve pad = 0, eos = 1, bos = 2, so batches, losses and decoding never
depend on which tokenizer made them:

  - `ByteTokenizer`: byte b is id b + 3; vocab 259 (`config.model.vocab_size`'s
    default). Any text round-trips exactly.
  - `SentencePieceTokenizer`: a model from `config.tokenizer.spm_model_path`,
    or one `train_sentencepiece` trained (unk = 3, byte fallback, no
    normalisation, so code indentation and any text round-trip exactly).

Which tokenizer a run uses, and training one into `<workdir>/spm.model` from
the dataset, is `pipeline.get_tokenizer`'s job: this module knows no datasets.

Bits per byte: `token_byte_lengths[id]` is how many UTF-8 bytes a token stands
for (0 for specials), so a trainer computes

    bytes = (tokenizer.token_byte_lengths[targets] * weights).sum()
    bits_per_byte = nll_sum_in_nats / (math.log(2) * bytes)

`bytes_per_token(ids)` is the same count divided by the number of real tokens.
"""
from __future__ import annotations

import abc
import os
import tempfile
from typing import Iterable, Union

import numpy as np

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3  # SentencePiece only.
NUM_SPECIAL = 3  # pad, eos, bos: the byte tokenizer's offset.

Text = Union[str, bytes]


def as_str(text: Text) -> str:
  """tfds mocks give `str`, real array_record data gives `bytes`."""
  return text.decode('utf-8') if isinstance(text, (bytes, np.bytes_)) else str(text)


def as_bytes(text: Text) -> bytes:
  return bytes(text) if isinstance(text, (bytes, np.bytes_)) else str(text).encode('utf-8')


class Tokenizer(abc.ABC):
  """Maps text to int ids and back; pad/eos/bos are never produced by `encode`."""

  pad_id = PAD_ID
  eos_id = EOS_ID
  bos_id = BOS_ID

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def token_byte_lengths(self) -> np.ndarray:
    """[vocab_size] int32: the UTF-8 bytes each token stands for (0 for specials)."""

  @abc.abstractmethod
  def encode_to_array(self, text: Text) -> np.ndarray:
    """The ids of `text` as an int32 array, without special tokens."""

  @abc.abstractmethod
  def _decode_ids(self, ids: list[int]) -> str:
    ...

  def encode(self, text: Text) -> list[int]:
    return self.encode_to_array(text).tolist()

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first pad or eos; bos (and other specials) dropped."""
    kept = []
    for token in np.asarray(ids).reshape(-1).tolist():
      if token in (self.pad_id, self.eos_id):
        break
      if token != self.bos_id:
        kept.append(int(token))
    return self._decode_ids(kept)

  def bytes_per_token(self, ids: Iterable[int]) -> float:
    """Mean UTF-8 bytes per non-special token of `ids` (1.0 for the byte tokenizer)."""
    ids = np.asarray(ids).reshape(-1)
    lengths = self.token_byte_lengths[ids]
    real = lengths > 0
    return float(lengths.sum() / max(int(real.sum()), 1))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past the three special ids."""

  @property
  def vocab_size(self) -> int:
    return 256 + NUM_SPECIAL

  @property
  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.int32)
    lengths[:NUM_SPECIAL] = 0
    return lengths

  def encode_to_array(self, text: Text) -> np.ndarray:
    return np.frombuffer(as_bytes(text), np.uint8).astype(np.int32) + NUM_SPECIAL

  def _decode_ids(self, ids: list[int]) -> str:
    data = bytes(token - NUM_SPECIAL for token in ids if NUM_SPECIAL <= token < self.vocab_size)
    return data.decode('utf-8', errors='replace')


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model whose pad/eos/bos ids are 0/1/2."""

  def __init__(self, model_path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.model_path = model_path
    self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    specials = (self._processor.pad_id(), self._processor.eos_id(), self._processor.bos_id())
    if specials != (PAD_ID, EOS_ID, BOS_ID):
      raise ValueError(
          f'{model_path}: pad/eos/bos ids are {specials}, longjax needs (0, 1, 2); '
          'train it with pad_id=0, eos_id=1, bos_id=2 (see train_sentencepiece).')
    self._byte_lengths = np.array(
        [self._piece_bytes(i) for i in range(self._processor.vocab_size())], np.int32)

  def __getstate__(self):
    # grain worker processes (config.dataset.num_workers) receive the tokenizer
    # pickled; the SentencePiece processor itself cannot be.
    return {'model_path': self.model_path}

  def __setstate__(self, state):
    self.__init__(state['model_path'])

  def _piece_bytes(self, token: int) -> int:
    processor = self._processor
    if processor.is_control(token) or processor.is_unknown(token):
      return 0
    if processor.is_byte(token):
      return 1
    # '▁' (U+2581) stands for one space byte.
    return len(processor.id_to_piece(token).replace('\u2581', ' ').encode('utf-8'))

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size()

  @property
  def token_byte_lengths(self) -> np.ndarray:
    return self._byte_lengths

  def encode_to_array(self, text: Text) -> np.ndarray:
    return np.asarray(self._processor.encode(as_str(text), out_type=int), np.int32)

  def _decode_ids(self, ids: list[int]) -> str:
    return self._processor.decode(ids)


def train_sentencepiece(texts: Iterable[Text], model_path: str, vocab_size: int, *,
                        max_chars: int = 50_000_000, chunk_chars: int = 2048,
                        model_type: str = 'bpe') -> str:
  """Trains a SentencePiece model on `texts`, written atomically to `model_path`.

  Documents are cut at line ends into chunks of at most `chunk_chars`, keeping
  the newlines, so that newlines and indentation get pieces of their own.
  Training stops reading after `max_chars` characters. BPE with byte fallback
  (as Llama and Gemma) trains in about a minute on the stdlib at 8k pieces on
  2 cores; 'unigram' (T5) is 2-50x slower here, worst at small vocabularies.
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top

  def chunks():
    remaining = max_chars
    for text in texts:
      chunk = []
      size = 0
      for line in as_str(text).splitlines(keepends=True):
        if size + len(line) > chunk_chars and chunk:
          yield ''.join(chunk)
          chunk, size = [], 0
        chunk.append(line[:chunk_chars])
        size += len(chunk[-1])
      if chunk:
        yield ''.join(chunk)
      remaining -= size
      if remaining <= 0:
        return

  folder = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder) as scratch:
    prefix = os.path.join(scratch, 'spm')
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=chunks(), model_prefix=prefix, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        byte_fallback=True, character_coverage=0.9995, split_digits=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, max_sentence_length=4 * chunk_chars,
        hard_vocab_limit=False, minloglevel=2, num_threads=os.cpu_count() or 1)
    # Other processes poll for model_path: it must appear complete or not at all.
    os.replace(prefix + '.model', model_path)
  return model_path
