"""Training and evaluation batches: tfds data source -> grain -> numpy batches.

Training (`build_train_iterator`), per process:
  source[process_index::process_count]   each process reads its own slice
  .shuffle(config.seed).repeat()         infinite, reshuffled every epoch
  .map(tokenize)                         LM: document -> ids; seq2seq: padded row
  LM only: windows of seq_len from 16 documents in turn -> first-fit packing (or padding)
  .batch(config.batch_size // process_count)
The result is a grain `DatasetIterator`: `get_state()`/`set_state()` give and
take a small JSON-able dict, saved with the model by Orbax:

    import grain, orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))  # restores in place

Evaluation (`build_eval_iterator`) is a re-iterable, finite grain IterDataset:
every process builds the same *global* batches (no shuffling) and keeps its
own rows, so all processes see the same number of batches and the metrics do
not depend on the process count. The last batch is padded with all-zero rows
(weights 0).

Batch formats: `lm_examples` (LM and synthetic tasks) and `seq2seq_examples`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import grain
import numpy as np

from longjax.data import lm_examples
from longjax.data import seq2seq_examples
from longjax.data import sources
from longjax.data import synthetic
from longjax.data import tokenizers

# Documents read ahead by grain's reader threads (LM) or rows (seq2seq).
READ_THREADS = 2
READ_BUFFER = 16
# LM training takes windows from this many documents in turn, so that one
# long document does not fill many consecutive batches.
INTERLEAVED_DOCUMENTS = 16


def is_seq2seq(config) -> bool:
  """True when the config names a target feature (synthetic tasks are LM)."""
  return bool(config.dataset.target_key) and not sources.is_synthetic(config.dataset.name)


def process_slice(config, process_index: Optional[int], process_count: Optional[int]):
  """(process_index, process_count, per-process batch size), checked."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size = {config.batch_size} is not divisible by the '
                     f'number of processes ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  return process_index, process_count, config.batch_size // process_count


def check_task_kind(config) -> None:
  """An encoder-decoder needs a target feature; a decoder-only LM cannot use one."""
  model_kind = config.get('model', {}).get('kind', None)
  if model_kind == 'encoder_decoder' and not is_seq2seq(config):
    raise ValueError(f"config.model.kind = 'encoder_decoder' needs a seq2seq dataset: set "
                     f'config.dataset.target_key (dataset {config.dataset.name!r}).')
  if model_kind == 'lm' and is_seq2seq(config):
    raise ValueError(f"config.dataset.target_key = {config.dataset.target_key!r} makes "
                     f"{config.dataset.name!r} seq2seq, but config.model.kind = 'lm'; set "
                     "config.model.kind = 'encoder_decoder' or clear target_key.")


def _checked_source(config, split):
  source = sources.get_data_source(config.dataset, split)
  info = getattr(source, 'dataset_info', None)
  if info is not None:
    sources.check_feature_keys(config.dataset, info.features)
  return source


def _tokenize_document(example, *, tokenizer, key):
  return tokenizer.encode_to_array(example[key])


def _seq2seq_example(example, *, tokenizer, input_key, target_key, seq_len, target_len,
                     with_text):
  row = seq2seq_examples.seq2seq_row(
      tokenizer.encode_to_array(example[input_key]), tokenizer.encode_to_array(example[target_key]),
      seq_len, target_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  if with_text:
    row['inputs_text'] = tokenizers.as_str(example[input_key])
    row['targets_text'] = tokenizers.as_str(example[target_key])
  return row


def stack_rows(rows, batch_size: Optional[int] = None) -> dict[str, Any]:
  """Stacks rows into a batch; pads to batch_size with zero rows ('' for text)."""
  padding = 0 if batch_size is None else batch_size - len(rows)
  batch = {}
  for key, first in rows[0].items():
    if isinstance(first, str):
      batch[key] = [row[key] for row in rows] + [''] * padding
    else:
      stacked = np.stack([row[key] for row in rows])
      if padding:
        stacked = np.concatenate([stacked, np.zeros((padding,) + stacked.shape[1:], stacked.dtype)])
      batch[key] = stacked
  return batch


def _rows_of_process(batch, *, process_index, local_batch):
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  return {key: value[rows] for key, value in batch.items()}


def _lm_rows(pieces: grain.IterDataset, seq_len: int, *, pack: bool, num_bins: int,
             seed: int, shuffle: bool) -> grain.IterDataset:
  if pack:
    return lm_examples.pack_pieces(pieces, seq_len, num_bins=num_bins, seed=seed,
                                   shuffle_bins=shuffle)
  return pieces.map(functools.partial(lm_examples.pad_piece, seq_len=seq_len))


def _prefetched(dataset: grain.IterDataset, config) -> grain.IterDataset:
  if config.dataset.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.dataset.num_workers))
  if config.dataset.prefetch > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=config.dataset.prefetch)
  return dataset


def build_train_iterator(config, tokenizer: tokenizers.Tokenizer, *,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None):
  """Infinite, checkpointable iterator of this process's training batches."""
  process_index, process_count, local_batch = process_slice(config, process_index, process_count)
  check_task_kind(config)
  seed = int(config.seed)
  seq_len = int(config.seq_len)
  name = config.dataset.name

  if sources.is_synthetic(name):
    task = synthetic.make_task(config, tokenizer, split='train', seq_len=seq_len,
                               filler_tokens=synthetic.filler_tokens(config, tokenizer, 'train'))
    rows = (grain.MapDataset.source(task)[process_index::process_count]
            .shuffle(seed).repeat().to_iter_dataset())
  else:
    source = _checked_source(config, config.dataset.split_train)
    documents = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed).repeat()
    read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)
    if is_seq2seq(config):
      rows = documents.map(functools.partial(
          _seq2seq_example, tokenizer=tokenizer, input_key=config.dataset.input_key,
          target_key=config.dataset.target_key, seq_len=seq_len,
          target_len=int(config.target_len), with_text=False)).to_iter_dataset(read_options)
    else:
      tokens = documents.map(functools.partial(
          _tokenize_document, tokenizer=tokenizer, key=config.dataset.input_key))
      pieces = lm_examples.interleaved_pieces(tokens, seq_len, cycle_length=INTERLEAVED_DOCUMENTS)
      rows = _lm_rows(pieces, seq_len, pack=config.dataset.pack,
                      num_bins=max(4 * local_batch, 16), seed=seed, shuffle=True)
  batches = rows.batch(local_batch, drop_remainder=True)
  return iter(_prefetched(batches, config))


def build_eval_iterator(config, tokenizer: tokenizers.Tokenizer, *, seq_len: Optional[int] = None,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        with_text: bool = False) -> grain.IterDataset:
  """Finite, deterministic, re-iterable batches of the eval split for this process.

  seq_len: LM window / seq2seq source / synthetic length; default
    `config.eval_seq_len` if > 0, else `config.seq_len`.
  with_text: seq2seq only; adds `inputs_text` and `targets_text` (lists of
    str, '' on padding rows) for decoding metrics.
  """
  process_index, _, local_batch = process_slice(config, process_index, process_count)
  check_task_kind(config)
  if seq_len is None:
    seq_len = config.eval_seq_len if config.eval_seq_len > 0 else config.seq_len
  seq_len = int(seq_len)
  global_batch = int(config.batch_size)
  name = config.dataset.name
  if with_text and not is_seq2seq(config):
    raise ValueError('with_text=True is for seq2seq datasets (config.dataset.target_key).')

  if sources.is_synthetic(name):
    task = synthetic.make_task(config, tokenizer, split='eval', seq_len=seq_len,
                               filler_tokens=synthetic.filler_tokens(config, tokenizer, 'eval'))
    rows = grain.MapDataset.source(task).to_iter_dataset()
  else:
    source = _checked_source(config, config.dataset.split_eval)
    documents = grain.MapDataset.source(source)
    read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)
    if is_seq2seq(config):
      rows = documents.map(functools.partial(
          _seq2seq_example, tokenizer=tokenizer, input_key=config.dataset.input_key,
          target_key=config.dataset.target_key, seq_len=seq_len,
          target_len=int(config.target_len), with_text=with_text)).to_iter_dataset(read_options)
    else:
      tokens = documents.map(functools.partial(
          _tokenize_document, tokenizer=tokenizer, key=config.dataset.input_key))
      pieces = grain.experimental.FlatMapIterDataset(tokens.to_iter_dataset(read_options),
                                                      lm_examples.DocumentToPieces(seq_len))
      rows = _lm_rows(pieces, seq_len, pack=config.dataset.pack,
                      num_bins=max(global_batch, 16), seed=0, shuffle=False)
  batches = rows.batch(global_batch, drop_remainder=False,
                       batch_fn=functools.partial(stack_rows, batch_size=global_batch))
  return batches.map(functools.partial(_rows_of_process, process_index=process_index,
                                       local_batch=local_batch))
