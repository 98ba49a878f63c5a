"""The tokenizer and the batches of a run, from a `DataConfig`.

    tokenizer = get_tokenizer(data_config, workdir)
    train_iter = build_train_iterator(data_config, tokenizer)       # infinite, checkpointable
    for batch in build_eval_iterator(data_config, tokenizer): ...   # finite, re-iterable

`data_config` is `DataConfig.from_config(config)` (`longjax.data.config`):
typed and checked once; nothing here reads the ConfigDict.

Training (`build_train_iterator`), per process: tfds data source -> grain -> numpy batches.
  source[process_index::process_count]   each process reads its own slice
  .shuffle(seed).repeat()                infinite, reshuffled every epoch
  .map(tokenize)                         LM: document -> ids; seq2seq: padded row
  LM only: windows of seq_len from 16 documents in turn -> first-fit packing (or padding)
  .batch(batch_size // process_count)
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
The tokenizer lives here rather than in `tokenizers` because training a
SentencePiece model needs the dataset (`sources.training_texts`).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Optional

import grain
import numpy as np

from longjax.data import lm_examples
from longjax.data import seq2seq_examples
from longjax.data import sources
from longjax.data import synthetic
from longjax.data import tokenizers
from longjax.data.config import DataConfig
from longjax.data.config import DatasetConfig

# Documents read ahead by grain's reader threads (LM) or rows (seq2seq).
READ_THREADS = 2
READ_BUFFER = 16
# LM training takes windows from this many documents in turn, so that one
# long document does not fill many consecutive batches.
INTERLEAVED_DOCUMENTS = 16


def wait_for_file(path: str, timeout_s: float, poll_s: float = 1.0) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f'{path} did not appear within {timeout_s:.0f} s (process 0 trains it).')
    time.sleep(poll_s)


def get_tokenizer(data_config: DataConfig, workdir: Optional[str], *,
                  process_index: Optional[int] = None,
                  wait_timeout_s: float = 3600.0) -> tokenizers.Tokenizer:
  """The tokenizer `data_config.tokenizer` names.

  For 'sentencepiece' without `spm_model_path`, process 0 trains
  `<workdir>/spm.model` (`spm_vocab_size` pieces) on the training split of
  the dataset unless it is already there (a restarted run reuses it); the
  other processes wait for the file. Then set `config.model.vocab_size` to
  `tokenizer.vocab_size`.
  """
  settings = data_config.tokenizer
  if settings.kind == 'bytes':
    return tokenizers.ByteTokenizer()
  # DataConfig admits only 'bytes' and 'sentencepiece'.
  if settings.spm_model_path:
    return tokenizers.SentencePieceTokenizer(settings.spm_model_path)
  if not workdir:
    raise ValueError('Training a SentencePiece model needs a workdir (or set '
                     'config.tokenizer.spm_model_path).')
  model_path = os.path.join(workdir, 'spm.model')
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index()
  if not os.path.exists(model_path):
    if process_index == 0:
      tokenizers.train_sentencepiece(sources.training_texts(data_config.dataset), model_path,
                                     settings.spm_vocab_size)
    else:
      wait_for_file(model_path, wait_timeout_s)
  return tokenizers.SentencePieceTokenizer(model_path)


def process_slice(batch_size: int, process_index: Optional[int], process_count: Optional[int]):
  """(process_index, process_count, per-process batch size), checked."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f'config.batch_size = {batch_size} is not divisible by the '
                     f'number of processes ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  return process_index, process_count, batch_size // process_count


def _checked_source(dataset_config: DatasetConfig, field: str):
  """The source of the split `config.dataset.<field>` names, its feature keys checked."""
  sources.check_dataset(dataset_config, (field,))  # Prepared, and the split not empty.
  source = sources.get_data_source(dataset_config, getattr(dataset_config, field))
  info = getattr(source, 'dataset_info', None)
  if info is not None:
    sources.check_feature_keys(dataset_config, info.features)
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


def _rows(data_config: DataConfig, documents: grain.MapDataset,
          tokenizer: tokenizers.Tokenizer, seq_len: int, *, train: bool, num_bins: int,
          with_text: bool = False) -> grain.IterDataset:
  """The rows of a text dataset: one seq2seq row per example, or packed LM windows.

  Training takes the windows of INTERLEAVED_DOCUMENTS documents in turn and
  shuffles the packing bins (seeded); evaluation reads documents in order and
  packs without shuffling, so its batches are the same on every run.
  """
  dataset = data_config.dataset
  read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)
  if data_config.seq2seq:
    return documents.map(functools.partial(
        _seq2seq_example, tokenizer=tokenizer, input_key=dataset.input_key,
        target_key=dataset.target_key, seq_len=seq_len, target_len=data_config.target_len,
        with_text=with_text)).to_iter_dataset(read_options)
  tokens = documents.map(functools.partial(
      _tokenize_document, tokenizer=tokenizer, key=dataset.input_key))
  if train:
    pieces = lm_examples.interleaved_pieces(tokens, seq_len, cycle_length=INTERLEAVED_DOCUMENTS)
  else:
    pieces = grain.experimental.FlatMapIterDataset(tokens.to_iter_dataset(read_options),
                                                    lm_examples.DocumentToPieces(seq_len))
  if not dataset.pack:
    return pieces.map(functools.partial(lm_examples.pad_piece, seq_len=seq_len))
  return lm_examples.pack_pieces(pieces, seq_len, num_bins=num_bins,
                                 seed=data_config.seed if train else 0, shuffle_bins=train)


def _prefetched(dataset: grain.IterDataset, dataset_config: DatasetConfig) -> grain.IterDataset:
  if dataset_config.num_workers > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=dataset_config.num_workers))
  if dataset_config.prefetch > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=dataset_config.prefetch)
  return dataset


def build_train_iterator(data_config: DataConfig, tokenizer: tokenizers.Tokenizer, *,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None):
  """Infinite, checkpointable iterator of this process's training batches."""
  process_index, process_count, local_batch = process_slice(
      data_config.batch_size, process_index, process_count)
  seed, seq_len = data_config.seed, data_config.seq_len
  if data_config.synthetic:
    task = synthetic.make_task(
        data_config, tokenizer, split='train', seq_len=seq_len,
        filler_tokens=synthetic.filler_tokens(data_config, tokenizer, 'train'))
    rows = (grain.MapDataset.source(task)[process_index::process_count]
            .shuffle(seed).repeat().to_iter_dataset())
  else:
    source = _checked_source(data_config.dataset, 'split_train')
    documents = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed).repeat()
    rows = _rows(data_config, documents, tokenizer, seq_len, train=True,
                 num_bins=max(4 * local_batch, 16))
  batches = rows.batch(local_batch, drop_remainder=True)
  return iter(_prefetched(batches, data_config.dataset))


def build_eval_iterator(data_config: DataConfig, tokenizer: tokenizers.Tokenizer, *,
                        seq_len: Optional[int] = None, process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        with_text: bool = False) -> grain.IterDataset:
  """Finite, deterministic, re-iterable batches of the eval split for this process.

  seq_len: LM window / seq2seq source / synthetic length; default
    `data_config.eval_seq_len`.
  with_text: seq2seq only; adds `inputs_text` and `targets_text` (lists of
    str, '' on padding rows) for decoding metrics.
  """
  process_index, _, local_batch = process_slice(data_config.batch_size, process_index,
                                                process_count)
  seq_len = data_config.eval_seq_len if seq_len is None else int(seq_len)
  global_batch = data_config.batch_size
  if with_text and not data_config.seq2seq:
    raise ValueError('with_text=True is for seq2seq datasets (config.dataset.target_key).')

  if data_config.synthetic:
    task = synthetic.make_task(
        data_config, tokenizer, split='eval', seq_len=seq_len,
        filler_tokens=synthetic.filler_tokens(data_config, tokenizer, 'eval'))
    rows = grain.MapDataset.source(task).to_iter_dataset()
  else:
    source = _checked_source(data_config.dataset, 'split_eval')
    rows = _rows(data_config, grain.MapDataset.source(source), tokenizer, seq_len, train=False,
                 num_bins=max(global_batch, 16), with_text=with_text)
  batches = rows.batch(global_batch, drop_remainder=False,
                       batch_fn=functools.partial(stack_rows, batch_size=global_batch))
  return batches.map(functools.partial(_rows_of_process, process_index=process_index,
                                       local_batch=local_batch))
