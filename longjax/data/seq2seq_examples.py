"""Sequence-to-sequence rows: source and target truncated and padded, no packing.

  inputs               [seq_len]    source ids, then eos (truncated to fit), then pad
  inputs_segment_ids   [seq_len]    1 on source tokens (eos included), 0 on padding
  decoder_inputs       [target_len] bos, target ids (shifted right by one)
  targets              [target_len] target ids, then eos
  weights              [target_len] float32, 1 on the targets (eos included)
  decoder_segment_ids  [target_len] 1 on real positions, 0 on padding

The target is cut to target_len - 1 ids so that eos always fits: a model
learns to stop even on truncated targets.
"""
from __future__ import annotations

import numpy as np

from longjax.data import tokenizers

SEQ2SEQ_FEATURES = ('inputs', 'inputs_segment_ids', 'decoder_inputs', 'targets', 'weights',
                    'decoder_segment_ids')


def _padded(values, length: int, dtype) -> np.ndarray:
  row = np.zeros(length, dtype)
  row[:len(values)] = values
  return row


def seq2seq_row(source_ids: np.ndarray, target_ids: np.ndarray, seq_len: int, target_len: int, *,
                bos_id: int = tokenizers.BOS_ID,
                eos_id: int = tokenizers.EOS_ID) -> dict[str, np.ndarray]:
  source = np.append(np.asarray(source_ids, np.int32)[:seq_len - 1], eos_id)
  target = np.asarray(target_ids, np.int32)[:target_len - 1]
  targets = np.append(target, eos_id)
  decoder_inputs = np.concatenate([[bos_id], target])
  return {
      'inputs': _padded(source, seq_len, np.int32),
      'inputs_segment_ids': _padded(np.ones(len(source)), seq_len, np.int32),
      'decoder_inputs': _padded(decoder_inputs, target_len, np.int32),
      'targets': _padded(targets, target_len, np.int32),
      'weights': _padded(np.ones(len(targets)), target_len, np.float32),
      'decoder_segment_ids': _padded(np.ones(len(targets)), target_len, np.int32),
  }
