"""Every dataset name longjax uses resolves with tfds, with the feature keys its config names."""
import dataclasses
import glob
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from tests.data import data_testing
from longjax.data import sources

# The tfds datasets the issue names for real runs, with the keys a config would use.
REAL_DATASETS = {
    'pg19': ('book_text', ''),
    'wmt14_translate/de-en': ('de', 'en'),
    'wmt19_translate/de-en': ('de', 'en'),
    'scientific_papers/arxiv': ('article', 'abstract'),
    'scientific_papers/pubmed': ('article', 'abstract'),
    'cnn_dailymail': ('article', 'highlights'),
    'lm1b': ('text', ''),
}
EMBEDDED_DATASETS = {
    'longjax_pystdlib': ('text', ''),
    'longjax_pydocs': ('source', 'docstring'),
    'longjax_pydocs/modules': ('source', 'docstring'),
    'longjax_bible_en_es': ('en', 'es'),
    'longjax_bible_en_es/verses_64': ('es', 'en'),
}


def config_files():
  return sorted(path for path in glob.glob(os.path.join(data_testing.CONFIGS_DIR, '*.py'))
                if not os.path.basename(path).startswith('_'))


def config_getter(path):
  """The file's get_config, if it has one that takes no argument."""
  get_config = getattr(data_testing.load_config_module(path), 'get_config', None)
  if get_config is None:
    return None
  required = [p for p in inspect.signature(get_config).parameters.values()
              if p.default is inspect.Parameter.empty]
  return None if required else get_config


def config_file_names():
  return [os.path.basename(path) for path in config_files() if config_getter(path)]


def assert_resolves(name, input_key, target_key, data_dir=None):
  config = data_testing.small_data_config(data_dir or '', dataset__name=name,
                                          dataset__input_key=input_key,
                                          dataset__target_key=target_key)
  if sources.is_synthetic(name):
    assert not target_key
    return
  builder = sources.get_builder(config.dataset)
  features = builder.info.features
  sources.check_feature_keys(config.dataset, features)
  for key in (input_key, target_key):
    if key:
      assert isinstance(features[key], tfds.features.Text), (name, key)


def test_base_config_is_among_the_configs_checked():
  assert 'base.py' in config_file_names()


@pytest.mark.parametrize('file_name', config_file_names())
def test_every_config_dataset_resolves(file_name, tmp_path):
  dataset = config_getter(os.path.join(data_testing.CONFIGS_DIR, file_name))().dataset
  assert_resolves(dataset.name, dataset.input_key, dataset.target_key, str(tmp_path))


@pytest.mark.parametrize('name', sorted(REAL_DATASETS))
def test_real_tfds_datasets_resolve_without_tensorflow(name, tmp_path):
  assert_resolves(name, *REAL_DATASETS[name], data_dir=str(tmp_path))


@pytest.mark.parametrize('name', sorted(EMBEDDED_DATASETS))
def test_embedded_datasets_resolve(name, tmp_path):
  assert_resolves(name, *EMBEDDED_DATASETS[name], data_dir=str(tmp_path))


def test_bible_config_follows_verses_per_example(make_data_config):
  dataset = make_data_config(dataset__name='longjax_bible_en_es',
                             dataset__verses_per_example=16).dataset
  assert sources.get_builder(dataset).builder_config.name == 'verses_16'
  dataset = dataclasses.replace(dataset, verses_per_example=3)  # Not predefined: one is made.
  assert sources.get_builder(dataset).builder_config.verses_per_example == 3
  dataset = dataclasses.replace(dataset, name='longjax_bible_en_es/verses_64')  # Explicit wins.
  assert sources.get_builder(dataset).builder_config.verses_per_example == 64


def test_unknown_name_lists_what_exists(make_data_config):
  config = make_data_config(dataset__name='no_such_dataset')
  for lookup in (sources.get_builder, lambda dataset: sources.get_data_source(dataset, 'train')):
    with pytest.raises(ValueError) as error:
      lookup(config.dataset)
    for name in sources.EMBEDDED_DATASETS + sources.SYNTHETIC_TASKS:
      assert name in str(error.value)


def test_missing_feature_key_is_named(make_data_config):
  config = make_data_config(dataset__name='scientific_papers/arxiv', dataset__input_key='text')
  with pytest.raises(ValueError, match="input_key = 'text'.*'abstract', 'article'"):
    sources.check_feature_keys(config.dataset, sources.get_builder(config.dataset).info.features)


def run_python(code):
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=data_testing.REPO_ROOT, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # A subprocess.
def test_translation_and_summarization_builders_register_without_h5py():
  # The trap: without h5py, tfds' legacy imports stop before summarization/translate.
  assert run_python("""
      import sys
      sys.modules['h5py'] = None  # As if h5py were not installed.
      import tensorflow_datasets as tfds
      from longjax.data import sources
      try:
        tfds.builder('wmt14_translate/de-en')
        print('tfds registered them by itself')
      except tfds.core.registered.DatasetNotFoundError:
        sources.register_tfds_builders()
        for name in ('wmt14_translate/de-en', 'cnn_dailymail', 'scientific_papers/arxiv'):
          tfds.builder(name)
        print('registered by longjax')
  """) in ('registered by longjax', 'tfds registered them by itself')


@pytest.mark.slow  # A subprocess.
def test_the_pipeline_never_imports_tensorflow(data_dir):
  assert run_python(f"""
      import dataclasses
      import sys
      from tests.data import data_testing
      from longjax import data
      from longjax.data import sources
      config = data_testing.small_data_config({data_dir!r})
      batch = next(data.build_train_iterator(config, data.ByteTokenizer(), process_index=0,
                                             process_count=1))
      for name in ('pg19', 'wmt14_translate/de-en', 'scientific_papers/arxiv'):
        sources.get_builder(dataclasses.replace(config.dataset, name=name))
      print('tensorflow' in sys.modules)
  """) == 'False'
