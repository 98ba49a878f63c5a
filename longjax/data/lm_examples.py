"""Language-model rows: documents cut into windows, packed with segment ids.

A document of tokens t_1..t_n becomes the sequence [bos, t_1, ..., t_n, eos]
and its n + 1 (input, target) pairs, where the target is the next token. Those
pairs are cut into windows ("pieces") of at most `seq_len`: a long document
gives many full windows (each one segment; a later window starts mid-document
without bos), its remainder and short documents give shorter pieces that are
packed together first-fit. In a packed row every piece is one segment:

  inputs       [L] int32  the token ids fed to the model
  targets      [L] int32  the next token at each input position
  weights      [L] float32  1 where the target counts in the loss, 0 on padding
  segment_ids  [L] int32  1, 2, ... per piece in the row, 0 on padding
  positions    [L] int32  position within the piece, from 0

For training, pieces of several documents are interleaved before packing
(`interleaved_pieces`); evaluation reads documents in order.

A target never crosses a piece boundary: the last target of a piece is the
token after it in its own document (or eos). Every attention kind aligns its
structure (global tokens, summary blocks, hierarchy groups, chunks) to the
segment, so a packed piece gets exactly the logits it gets alone
(tests/models/test_packing.py), whatever it is packed with.
"""
from __future__ import annotations

import functools

import grain
import numpy as np

from longjax.data import tokenizers

# global_mask marks tokens a task makes global for global_local attention
# (Longformer's task-chosen global tokens, e.g. a question); 0 for plain text.
LM_FEATURES = ('inputs', 'targets', 'weights', 'segment_ids', 'positions', 'global_mask')


def document_pieces(tokens: np.ndarray, seq_len: int, *, bos_id: int = tokenizers.BOS_ID,
                    eos_id: int = tokenizers.EOS_ID) -> list[dict[str, np.ndarray]]:
  """The windows of one tokenized document, each {inputs, targets, weights}."""
  sequence = np.concatenate([[bos_id], np.asarray(tokens, np.int32), [eos_id]]).astype(np.int32)
  num_pairs = len(sequence) - 1
  pieces = []
  for start in range(0, num_pairs, seq_len):
    stop = min(start + seq_len, num_pairs)
    pieces.append({
        'inputs': sequence[start:stop],
        'targets': sequence[start + 1:stop + 1],
        'weights': np.ones(stop - start, np.float32),
    })
  return pieces


class DocumentToPieces(grain.experimental.FlatMapTransform):
  """grain flat-map: tokenized document -> its windows."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    # Only used by grain's MapDataset flat-map; an IterDataset takes any fan-out.
    self.max_fan_out = 1 << 30

  def flat_map(self, tokens):
    return document_pieces(tokens, self.seq_len)


def _document_dataset(tokens, seq_len: int) -> grain.IterDataset:
  # No reader threads: the pieces are already in memory.
  return grain.MapDataset.source(document_pieces(tokens, seq_len)).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def interleaved_pieces(documents: grain.MapDataset, seq_len: int, *,
                       cycle_length: int) -> grain.IterDataset:
  """Pieces of `cycle_length` documents at a time, taken in turn.

  A long document thus never fills consecutive rows: its windows alternate
  with those of the other open documents (grain's interleave, checkpointable;
  a restored iterator re-reads only the open documents).
  """
  per_document = documents.map(functools.partial(_document_dataset, seq_len=seq_len))
  return grain.experimental.InterleaveIterDataset(per_document, cycle_length=cycle_length)


def pad_piece(piece: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One piece alone in a row (no packing): segment 1, padding 0."""
  length = len(piece['inputs'])
  row = {key: np.zeros(seq_len, value.dtype) for key, value in piece.items()}
  for key, value in piece.items():
    row[key][:length] = value
  row['segment_ids'] = (np.arange(seq_len) < length).astype(np.int32)
  row['positions'] = np.where(row['segment_ids'] > 0, np.arange(seq_len), 0).astype(np.int32)
  row.setdefault('global_mask', np.zeros(seq_len, np.int32))
  return row


def pack_pieces(pieces: grain.IterDataset, seq_len: int, *, num_bins: int, seed: int,
                shuffle_bins: bool) -> grain.IterDataset:
  """First-fit packing of pieces into rows of `seq_len` (grain, checkpointable)."""
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces,
      length_struct={'inputs': seq_len, 'targets': seq_len, 'weights': seq_len},
      num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins,
      # Targets and weights share the inputs' segments; only inputs get ids.
      meta_features=('targets', 'weights'))
  return packed.map(_rename_packed)


def _rename_packed(row):
  return {
      'inputs': row['inputs'].astype(np.int32),
      'targets': row['targets'].astype(np.int32),
      'weights': row['weights'].astype(np.float32),
      'segment_ids': row['inputs_segment_ids'].astype(np.int32),
      'positions': row['inputs_positions'].astype(np.int32),
      'global_mask': np.zeros(row['inputs'].shape, np.int32),
  }
