"""Data a run cannot read fails at once, before anything compiles, naming the config field:
a tfds dataset not prepared in data_dir (nothing is downloaded unless
config.dataset.allow_download), an empty or unknown split."""
import os
import time

import pytest
import tensorflow_datasets as tfds

from longjax import data
from longjax.data import sources
from longjax.train import setup
from tests.data import data_testing
from tests.train import train_testing

# A registered tfds dataset (tensorflow_datasets' own builder) that no test prepares.
UNPREPARED = 'imdb_reviews'


@pytest.fixture
def downloads(monkeypatch):
  """Every DatasetBuilder.download_and_prepare of a tfds (not embedded) dataset, refused.

  The list receives (dataset name, kwargs) of each attempt; the attempt raises, so that a test
  never reaches the network whatever the code under test does.
  """
  attempts = []
  prepare = tfds.core.DatasetBuilder.download_and_prepare

  def refuse(self, *args, **kwargs):
    if self.name in data.EMBEDDED_DATASETS:
      return prepare(self, *args, **kwargs)  # Built from local text: nothing downloaded.
    attempts.append((self.name, kwargs))
    raise AssertionError(f'a download of {self.name} was attempted')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', refuse)
  return attempts


def _dataset_config(data_dir, **overrides):
  return data_testing.small_data_config(
      data_dir, dataset__name=UNPREPARED, dataset__input_key='text', **overrides).dataset


def _assert_names_the_fix(message, data_dir):
  assert f"config.dataset.name = '{UNPREPARED}'" in message, message
  assert str(data_dir) in message, message
  assert (f'tfds build {UNPREPARED} --data_dir={data_dir} --file_format=array_record'
          in message), message
  assert 'config.dataset.allow_download' in message, message


def test_an_unprepared_tfds_dataset_is_refused_without_downloading(tmp_path, downloads):
  data_dir = tmp_path / 'tfds'
  dataset = _dataset_config(str(data_dir))
  for read in (lambda: sources.get_data_source(dataset, 'train'),
               lambda: sources.check_dataset(dataset)):
    with pytest.raises(ValueError) as error:
      read()
    assert downloads == []
    assert isinstance(error.value, data.DataConfigError)  # Printed as FATAL lines by main.
    _assert_names_the_fix(str(error.value), data_dir)
  assert not (data_dir / UNPREPARED).exists()


def test_an_empty_data_dir_names_tfds_default_dir(downloads):
  default = os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  if os.path.exists(os.path.join(default, UNPREPARED)):
    pytest.skip(f'{UNPREPARED} is prepared in {default} on this machine')
  with pytest.raises(ValueError) as error:
    sources.check_dataset(_dataset_config(''))
  assert downloads == []
  _assert_names_the_fix(str(error.value), default)
  assert "config.dataset.data_dir = ''" in str(error.value)


def test_build_run_refuses_an_unprepared_dataset(tmp_path, downloads):
  data_dir = tmp_path / 'tfds'
  config = train_testing.tiny_config(dataset__name=UNPREPARED, dataset__data_dir=str(data_dir))
  with pytest.raises(ValueError) as error:
    setup.build_run(config, str(tmp_path / 'run'))
  assert downloads == []
  _assert_names_the_fix(str(error.value), data_dir)


def test_allow_download_lets_tfds_download_and_prepare_it_as_array_record(tmp_path, downloads):
  dataset = _dataset_config(str(tmp_path / 'tfds'), dataset__allow_download=True)
  with pytest.raises(AssertionError, match='a download of imdb_reviews was attempted'):
    sources.get_data_source(dataset, 'train')
  assert downloads == [(UNPREPARED, {'file_format': 'array_record'})]


def test_allow_download_is_off_by_default_and_must_be_a_bool(tmp_path):
  assert data_testing.small_config(str(tmp_path)).dataset.allow_download is False
  raw = data_testing.small_config(str(tmp_path)).to_dict()  # A dict: no ConfigDict type check.
  raw['dataset']['allow_download'] = 'yes'
  with pytest.raises(data.DataConfigError,
                     match=r"config\.dataset\.allow_download = 'yes': must be True or False"):
    data.DataConfig.from_config(raw)


def test_an_embedded_dataset_is_still_built_where_it_is_missing(tmp_path, downloads):
  data_dir = tmp_path / 'tfds'
  dataset = data_testing.small_data_config(str(data_dir)).dataset  # longjax_pystdlib.
  sources.check_dataset(dataset)
  assert downloads == []
  assert len(sources.get_data_source(dataset, 'validation')) > 0


@pytest.mark.parametrize('field, split', [('split_train', 'train[:0]'),
                                          ('split_eval', 'validation[:0]')])
def test_an_empty_split_is_named(make_config, make_data_config, tmp_path, field, split):
  overrides = {f'dataset__{field}': split}
  expected = f"config.dataset.{field} = '{split}' selects no examples of 'longjax_pystdlib'"
  # The run: before the tokenizer, the model or a compile.
  with pytest.raises(ValueError) as error:
    setup.build_run(make_config(**overrides), str(tmp_path / 'run'))
  assert isinstance(error.value, data.DataConfigError)
  assert expected in str(error.value)
  # The pipelines themselves, for callers that build them directly.
  data_config = make_data_config(**overrides)
  build = (data.build_train_iterator if field == 'split_train' else data.build_eval_iterator)
  with pytest.raises(ValueError, match=expected.replace('[', r'\[').replace(']', r'\]')):
    build(data_config, data.ByteTokenizer(), process_index=0, process_count=1)


def test_an_unknown_split_names_the_field(make_config, tmp_path):
  with pytest.raises(ValueError) as error:
    setup.build_run(make_config(dataset__split_eval='test'), str(tmp_path / 'run'))
  assert "config.dataset.split_eval = 'test'" in str(error.value)
  assert "'train', 'validation'" in str(error.value)


# Through the command line ---------------------------------------------------------------

MAIN_WITHOUT_DOWNLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'main_without_downloads.py')


def _main(workdir, **overrides):
  env = dict(train_testing.subprocess_env(), LONGJAX_HUGEPAGES='0')
  began = time.monotonic()
  result = train_testing.run_python(
      [MAIN_WITHOUT_DOWNLOADS, '--config=configs/tiny.py', f'--workdir={workdir}']
      + train_testing.overrides_to_flags(**overrides), env=env, check=False, timeout=240)
  return result, time.monotonic() - began


def _assert_fatal_before_compiling(result, expected):
  assert result.returncode == 1, result.stderr[-4000:]
  assert 'would be downloaded' not in result.stderr, result.stderr[-4000:]
  assert 'Traceback' not in result.stderr, result.stderr[-4000:]
  assert 'Train step compiled' not in result.stderr, result.stderr[-4000:]
  fatal = [line for line in result.stderr.splitlines() if line.startswith('FATAL ')]
  assert len(fatal) == 1 and expected in fatal[0], result.stderr[-4000:]
  return fatal[0]


@pytest.mark.slow  # A subprocess.
def test_main_refuses_an_unprepared_dataset_at_once(tmp_path):
  data_dir = tmp_path / 'tfds'
  result, seconds = _main(tmp_path / 'run', dataset__name=UNPREPARED,
                          dataset__data_dir=data_dir)
  line = _assert_fatal_before_compiling(result, f"config.dataset.name = '{UNPREPARED}'")
  _assert_names_the_fix(line, data_dir)
  assert seconds < 120  # Not tfds' retries (217 s before the fix).


@pytest.mark.slow  # A subprocess.
@pytest.mark.parametrize('field, split', [('split_train', 'train[:0]'),
                                          ('split_eval', 'validation[:0]')])
def test_main_names_an_empty_split_before_compiling(tmp_path, data_dir, field, split):
  result, _ = _main(tmp_path / 'run', dataset__name='longjax_pystdlib',
                    dataset__data_dir=data_dir, **{f'dataset__{field}': split})
  _assert_fatal_before_compiling(
      result, f"config.dataset.{field} = '{split}' selects no examples of 'longjax_pystdlib'")
