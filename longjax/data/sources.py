"""From a dataset name to a random-access data source.

The functions here take a `DatasetConfig` (`config.dataset`, typed; see
`longjax.data.config`). Every non-synthetic name goes through
`tfds.data_source` (array_record read by grain, no TensorFlow): the embedded
builders (`longjax.data.embedded`) are built there on first use, from text on
this machine; any other name is a tfds dataset that must already be prepared
in `data_dir` (`tfds build NAME --data_dir=DIR --file_format=array_record`):
nothing is downloaded while a run starts unless `config.dataset.allow_download`.
`check_dataset` says so, and that every split has examples, before anything
is compiled.

`longjax_bible_en_es` without an explicit config ('longjax_bible_en_es/verses_16')
takes its config from `verses_per_example`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from longjax.data import embedded
from longjax.data import tokenizers
from longjax.data.config import base_name
from longjax.data.config import DataConfigError
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


class DatasetUnavailableError(DataConfigError):
  """The dataset or a split the config names has nothing to read; raised before any compile.

  Not prepared in data_dir (and not to be downloaded), or a split that selects
  no examples. A DataConfigError, so the command line prints it as one FATAL line.
  """

  def __init__(self, problem: str, *, heading: str):
    super().__init__([problem])
    self.args = (f'{heading} {problem}',)
    self.heading = heading


def is_embedded(name: str) -> bool:
  return base_name(name) in EMBEDDED_DATASETS


def not_prepared_message(name: str, data_dir: str, builder: tfds.core.DatasetBuilder) -> str:
  root = os.fspath(builder.data_dir_root)
  where = repr(data_dir) if data_dir else "'' ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  return (f'config.dataset.name = {name!r} is not prepared in {root} (config.dataset.data_dir = '
          f'{where}), and a run downloads nothing unless config.dataset.allow_download = True. '
          f'Prepare it once (this needs TensorFlow and the network): '
          f'tfds build {name} --data_dir={root} --file_format=array_record')


def _prepare(builder: tfds.core.DatasetBuilder, name: str, data_dir: str,
             allow_download: bool) -> None:
  """Builds an embedded dataset, downloads a tfds one if allowed, else DatasetUnavailableError."""
  if isinstance(builder, tfds.core.read_only_builder.ReadOnlyBuilder) or builder.is_prepared():
    return  # A read-only builder is made from the prepared files in data_dir.
  if not (is_embedded(name) or allow_download):
    raise DatasetUnavailableError(not_prepared_message(name, data_dir, builder),
                                  heading='Dataset not prepared:')
  builder.download_and_prepare(file_format='array_record')


def check_dataset(dataset_config: DatasetConfig,
                  fields: tuple[str, ...] = ('split_train', 'split_eval')) -> None:
  """Fails now, naming the field, when the run would find no data to read.

  A tfds dataset must be prepared in data_dir (unless allow_download; an
  embedded one is built here), and each split the `fields` of the config name
  (both by default) must be a split of it that selects at least one example.
  Raises DatasetUnavailableError. Synthetic tasks have nothing to check.
  """
  if dataset_config.synthetic:
    return
  name = dataset_config.name
  builder = get_builder(dataset_config)
  _prepare(builder, name, dataset_config.data_dir, dataset_config.allow_download)
  splits = builder.info.splits
  if not splits:
    return  # Split sizes unknown (tfds.testing.mock_data makes its examples on the fly).
  sizes = ', '.join(f'{split} {info.num_examples}' for split, info in splits.items())
  for field in fields:
    split = getattr(dataset_config, field)
    try:
      count = splits[split].num_examples
    except (KeyError, ValueError) as error:  # Unknown split name, bad slice.
      raise DatasetUnavailableError(f'config.dataset.{field} = {split!r}: {error}',
                                    heading='Invalid config:') from None
    if count == 0:
      raise DatasetUnavailableError(
          f'config.dataset.{field} = {split!r} selects no examples of {name!r} (its splits '
          f'have {sizes} examples).', heading='Invalid config:')


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
                     builder_kwargs=builder_kwargs_for(dataset_config),
                     allow_download=dataset_config.allow_download)


def data_source(name: str, split: str, *, data_dir: str = '', builder_kwargs=None,
                allow_download: bool = False):
  """`tfds.data_source` for a tfds or embedded name, as array_record, with a clear error.

  An embedded dataset is built on first use; a tfds dataset not prepared in
  data_dir raises DatasetUnavailableError unless allow_download.
  """
  register_tfds_builders()
  if is_synthetic(name):
    raise ValueError(f'{name!r} is a synthetic task; use longjax.data.synthetic.')
  try:
    builder = tfds.builder(name, data_dir=data_dir or None, **(builder_kwargs or {}))
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(unknown_dataset_message(name, error)) from error
  _prepare(builder, name, data_dir, allow_download)
  # Prepared now: tfds.data_source only opens it (download=False, so it never fetches).
  return tfds.data_source(
      name, split=split, data_dir=data_dir or None, builder_kwargs=builder_kwargs or None,
      download=False)


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
