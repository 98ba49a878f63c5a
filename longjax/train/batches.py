"""Global batches: shapes, shardings, and assembly from each process's rows.

The only place in the trainer that knows the feature names of both batch
formats (`lm_examples.LM_FEATURES`, `seq2seq_examples.SEQ2SEQ_FEATURES`) and
how the rows a process reads become one global `jax.Array` per feature.
Every feature is [batch, length]: the batch over data x fsdp, the length over
the sequence axis, as the `batch` and `length` rules say.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from longjax import data
from longjax import sharding
from longjax.data import lm_examples
from longjax.data import seq2seq_examples


class Batches:
  """Layouts of the global batches of one run, by sequence length."""

  def __init__(self, data_config: data.DataConfig, mesh: Mesh, rules):
    self.global_batch_size = data_config.batch_size
    self.target_len = data_config.target_len
    self.seq2seq = data_config.seq2seq
    self.mesh = mesh
    self.rules = rules
    self._shardings = {}  # seq_len -> {feature: NamedSharding}

  def shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, int], Any]]:
    """(global shape, dtype) of every feature."""
    b = self.global_batch_size
    if self.seq2seq:
      lengths = {'inputs': seq_len, 'inputs_segment_ids': seq_len}
      return {key: ((b, lengths.get(key, self.target_len)),
                    np.float32 if key == 'weights' else np.int32)
              for key in seq2seq_examples.SEQ2SEQ_FEATURES}
    return {key: ((b, seq_len), np.float32 if key == 'weights' else np.int32)
            for key in lm_examples.LM_FEATURES}

  def shardings(self, seq_len: int) -> dict[str, NamedSharding]:
    if seq_len not in self._shardings:
      self._shardings[seq_len] = {
          key: NamedSharding(self.mesh, sharding.logical_to_spec(
              ('batch', 'length'), shape, self.mesh, self.rules))
          for key, (shape, _) in self.shapes(seq_len).items()}
    return self._shardings[seq_len]

  def abstract(self, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """What a step is compiled for, before any batch exists."""
    layout = self.shardings(seq_len)
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=layout[key])
            for key, (shape, dtype) in self.shapes(seq_len).items()}

  def tokens_per_step(self, seq_len: int) -> int:
    return self.global_batch_size * (seq_len + (self.target_len if self.seq2seq else 0))

  def global_batch(self, local_batch) -> dict[str, jax.Array]:
    """One global jax.Array per feature from this process's rows."""
    seq_len = local_batch['inputs'].shape[1]
    layout = self.shardings(seq_len)
    return {key: jax.make_array_from_process_local_data(
        layout[key], np.asarray(local_batch[key]),
        (self.global_batch_size,) + np.shape(local_batch[key])[1:])
            for key in layout}
