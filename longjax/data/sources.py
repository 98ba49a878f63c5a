"""From a dataset name to a random-access data source.

The functions here take a `DatasetConfig` (`config.dataset`, typed; see
`longjax.data.config`). Every non-synthetic name goes through
`tfds.data_source` (array_record read by grain, no TensorFlow): the embedded
builders (`longjax.data.embedded`) are built there on first use; any other
name is a tfds dataset that must be prepared in `data_dir` (or downloadable
from there).

`longjax_bible_en_es` without an explicit config ('longjax_bible_en_es/verses_16')
takes its config from `verses_per_example`.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from longjax.data import embedded
from longjax.data import tokenizers
from longjax.data.config import base_name
from longjax.data.config import DatasetConfig
from longjax.data.config import is_synthetic
from longjax.data.config import SYNTHETIC_TASKS
from longjax.data.embedded import bible_en_es

EMBEDDED_DATASETS = tuple(embedded.BUILDERS)
# base_name, is_synthetic and SYNTHETIC_TASKS are defined in `config` (DataConfig
# needs them there, without importing tfds) and stay importable from here.


@functools.cache
def register_tfds_builders() -> None:
  """Makes every tfds name this project uses resolvable, without TensorFlow.

  tfds imports its legacy dataset folders in one `try` and stops at the first
  ImportError; `nearest_neighbors` needs h5py and comes before summarization,
  text and translate. Importing those three ourselves registers them even when
  that chain broke (h5py is a dependency of longjax, so it normally holds).
  """
  for module in ('summarization', 'text', 'translate'):
    try:
      __import__(f'tensorflow_datasets.{module}')
    except ImportError:
      pass


def builder_kwargs_for(dataset_config: DatasetConfig) -> dict[str, Any]:
  """Extra builder arguments the config implies (the Bible's verses per example)."""
  name = dataset_config.name
  if base_name(name) == bible_en_es.LongjaxBibleEnEs.name and '/' not in name:
    return {'config': bible_en_es.config_for(dataset_config.verses_per_example)}
  return {}


def unknown_dataset_message(name: str, error: Exception) -> str:
  return (f'Unknown dataset {name!r} ({type(error).__name__}: {error}). config.dataset.name '
          f'must be a tfds name (e.g. pg19, wmt14_translate/de-en, scientific_papers/arxiv), '
          f'an embedded dataset ({", ".join(EMBEDDED_DATASETS)}) or a synthetic task '
          f'({", ".join(SYNTHETIC_TASKS)}).')


def get_builder(dataset_config: DatasetConfig) -> tfds.core.DatasetBuilder:
  """The tfds builder of the dataset (resolving only; nothing is built)."""
  register_tfds_builders()
  name = dataset_config.name
  if is_synthetic(name):
    raise ValueError(f'{name!r} is a synthetic task, it has no tfds builder.')
  try:
    return tfds.builder(name, data_dir=dataset_config.data_dir or None,
                        **builder_kwargs_for(dataset_config))
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(unknown_dataset_message(name, error)) from error


def get_data_source(dataset_config: DatasetConfig, split: str):
  """A random-access source (len, [i]) of feature dicts for one split of the dataset.

  Embedded datasets are built here on first use.
  """
  return data_source(dataset_config.name, split, data_dir=dataset_config.data_dir,
                     builder_kwargs=builder_kwargs_for(dataset_config))


def data_source(name: str, split: str, *, data_dir: str = '', builder_kwargs=None):
  """`tfds.data_source` for a tfds or embedded name, as array_record, with a clear error."""
  register_tfds_builders()
  if is_synthetic(name):
    raise ValueError(f'{name!r} is a synthetic task; use longjax.data.synthetic.')
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir or None, builder_kwargs=builder_kwargs or None,
        download_and_prepare_kwargs={'file_format': 'array_record'})
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(unknown_dataset_message(name, error)) from error


def check_feature_keys(dataset_config: DatasetConfig, features) -> None:
  """Raises when the config names a feature the dataset does not have."""
  for field in ('input_key', 'target_key'):
    key = getattr(dataset_config, field)
    if key and key not in features:
      raise ValueError(f'config.dataset.{field} = {key!r} is not a feature of '
                       f'{dataset_config.name!r}; it has {sorted(features)}.')


def training_texts(dataset_config: DatasetConfig,
                   max_examples: Optional[int] = None) -> Iterator[Any]:
  """The input (and target) texts of the training split, for tokenizer training."""
  if dataset_config.synthetic:
    raise ValueError(
        'A SentencePiece model cannot be trained on a synthetic task; set '
        'config.tokenizer.spm_model_path or use the byte tokenizer.')
  source = get_data_source(dataset_config, dataset_config.split_train)
  keys = [key for key in (dataset_config.input_key, dataset_config.target_key) if key]
  count = len(source) if max_examples is None else min(len(source), max_examples)
  for index in range(count):
    example = source[index]
    for key in keys:
      yield tokenizers.as_str(example[key])
