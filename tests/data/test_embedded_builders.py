"""The embedded tfds builders build offline, deterministically, with the content they promise."""
import ast
import hashlib
import importlib
import inspect
import os
import platform
import shutil

import pytest
import tensorflow_datasets as tfds

from tests.data.data_testing import requires_sword
from longjax.data import embedded
from longjax.data import sources
from longjax.data import stdlib_corpus
from longjax.data import sword
from longjax.data import tokenizers

JSON_FILES = ('__init__.py', 'decoder.py', 'encoder.py', 'scanner.py', 'tool.py')


def read_split(builder, split):
  source = builder.as_data_source(split=split)
  return [{key: tokenizers.as_str(value) if isinstance(value, (str, bytes)) else value
           for key, value in source[index].items()} for index in range(len(source))]


def build(builder_class, data_dir, config):
  builder = builder_class(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(file_format='array_record')
  return builder


def expected_split(relative_path):
  """The documented rule, computed independently: sha256 of the path, 1 in 10 to validation."""
  digest = hashlib.sha256(relative_path.encode('utf-8')).digest()
  return 'validation' if int.from_bytes(digest[:8], 'big') % 10 == 0 else 'train'


@pytest.fixture(scope='module')
def json_only_stdlib(tmp_path_factory):
  """A stand-in stdlib folder: the real json package, plus test files that must be left out."""
  root = tmp_path_factory.mktemp('stdlib')
  package = root / 'json'
  package.mkdir()
  for name in JSON_FILES:
    shutil.copy(os.path.join(stdlib_corpus.stdlib_dir(), 'json', name), package / name)
  (package / 'tests').mkdir()
  (package / 'tests' / 'helper.py').write_text('"""Not stdlib code."""\n')
  (root / 'test_top.py').write_text('"""A test module."""\nx = 1\n')
  return str(root)


def test_pystdlib_reads_the_files_and_leaves_tests_out(json_only_stdlib, tmp_path):
  config = embedded.StdlibConfig(name='json_only', stdlib_dir=json_only_stdlib)
  builder = build(embedded.LongjaxPystdlib, tmp_path, config)
  examples = [e for split in builder.info.splits for e in read_split(builder, split)]
  assert sorted(e['path'] for e in examples) == sorted(f'json/{name}' for name in JSON_FILES)
  for split in builder.info.splits:
    for example in read_split(builder, split):
      assert expected_split(example['path']) == split
      with open(os.path.join(json_only_stdlib, example['path']), encoding='utf-8') as f:
        assert example['text'] == f.read()
  assert builder.info.metadata['python_version'] == platform.python_version()
  assert builder.info.metadata['stdlib_dir'] == json_only_stdlib


def test_pystdlib_sample_is_deterministic_and_split_by_path_hash(tmp_path):
  config = embedded.StdlibConfig(name='sample_40', max_files=40)
  first = build(embedded.LongjaxPystdlib, tmp_path / 'first', config)
  second = build(embedded.LongjaxPystdlib, tmp_path / 'second', config)
  for split in ('train', 'validation'):
    examples = read_split(first, split)
    assert examples, split
    assert examples == read_split(second, split)  # Same content, same order.
    assert all(expected_split(e['path']) == split for e in examples)


def test_full_pystdlib_is_the_non_test_stdlib(make_data_config):
  config = make_data_config()
  train = sources.get_data_source(config.dataset, 'train')
  validation = sources.get_data_source(config.dataset, 'validation')
  paths = {tokenizers.as_str(source[i]['path'])
           for source in (train, validation) for i in range(len(source))}
  assert len(paths) == len(train) + len(validation) > 600
  assert {'os.py', 'json/decoder.py', 'asyncio/tasks.py'} <= paths
  assert not any('/test/' in p or '/tests/' in p or p.startswith('test/') or
                 os.path.basename(p).startswith('test_') for p in paths)
  assert 0.05 < len(validation) / len(paths) < 0.15
  total_bytes = sum(len(train[i]['text']) for i in range(len(train)))
  assert total_bytes > 8_000_000  # About 12 MB for CPython 3.11.


def test_pydocs_pairs_match_the_runtime_docstrings(json_only_stdlib, tmp_path):
  config = embedded.PydocsConfig(name='json_only', stdlib_dir=json_only_stdlib)
  builder = build(embedded.LongjaxPydocs, tmp_path, config)
  pairs = [pair for split in builder.info.splits for pair in read_split(builder, split)]
  kinds = {pair['kind'] for pair in pairs}
  assert {'module', 'class', 'function'} <= kinds
  for pair in pairs:
    # Every json pair names an object reachable at run time: compare with its __doc__.
    module_name = pair['path'][:-len('.py')].replace('/', '.').removesuffix('.__init__')
    owner = importlib.import_module(module_name)
    if pair['kind'] != 'module':
      for attribute in pair['name'][len(module_name) + 1:].split('.'):
        owner = getattr(owner, attribute)
    assert pair['docstring'] == inspect.cleandoc(owner.__doc__), pair['name']
    # The source side keeps the code and loses every docstring, nested ones too.
    tree = ast.parse(pair['source'])
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        assert ast.get_docstring(node) is None, pair['name']
  names = {pair['name'] for pair in pairs}
  assert {'json', 'json.decoder', 'json.dumps', 'json.decoder.JSONDecoder',
          'json.decoder.JSONDecoder.raw_decode'} <= names


def test_pydocs_module_config_keeps_long_module_pairs(json_only_stdlib, tmp_path):
  config = embedded.PydocsConfig(name='json_modules', kinds=('module',), stdlib_dir=json_only_stdlib)
  builder = build(embedded.LongjaxPydocs, tmp_path, config)
  pairs = [pair for split in builder.info.splits for pair in read_split(builder, split)]
  import json.decoder  # pylint: disable=g-import-not-at-top
  by_name = {pair['name']: pair for pair in pairs}
  assert {pair['kind'] for pair in pairs} == {'module'}
  assert by_name['json.decoder']['docstring'] == inspect.cleandoc(json.decoder.__doc__)
  assert 'class JSONDecoder' in by_name['json.decoder']['source']
  assert 'def raw_decode' in by_name['json.decoder']['source']


def test_pydocs_sample_is_deterministic(tmp_path):
  config = embedded.PydocsConfig(name='sample_30', max_files=30)
  first = build(embedded.LongjaxPydocs, tmp_path / 'first', config)
  second = build(embedded.LongjaxPydocs, tmp_path / 'second', config)
  for split in ('train', 'validation'):
    examples = read_split(first, split)
    assert examples, split
    assert examples == read_split(second, split)
    assert all(expected_split(e['path']) == split for e in examples)


VALIDATION_BOOKS = {'1Sam', '2Sam', 'Zech', 'Titus', '2John'}
TEST_BOOKS = {'1Kgs', 'Mal', 'Rom', '2Cor', 'Col'}


@requires_sword
def test_bible_splits_by_book_and_groups_verses_within_chapters(make_data_config, tmp_path):
  config = make_data_config(dataset__name='longjax_bible_en_es')  # verses_per_example = 4.
  splits = {split: [{k: tokenizers.as_str(v) if isinstance(v, bytes) else v
                     for k, v in source[i].items()} for i in range(len(source))]
            for split in ('train', 'validation', 'test')
            for source in [sources.get_data_source(config.dataset, split)]}
  assert {e['book'] for e in splits['validation']} == VALIDATION_BOOKS
  assert {e['book'] for e in splits['test']} == TEST_BOOKS
  assert len({e['book'] for e in splits['train']}) == 66 - 10
  spans = [e['last_verse'] - e['first_verse'] + 1 for examples in splits.values() for e in examples]
  assert min(spans) >= 1
  # A group spans more than 4 verse numbers only where an unpaired verse was skipped.
  assert sum(span <= 4 for span in spans) / len(spans) > 0.99
  assert sum(span == 4 for span in spans) / len(spans) > 0.7  # Short groups end chapters.
  genesis = next(e for e in splits['train'] if (e['book'], e['chapter'], e['first_verse']) == ('Gen', 1, 1))
  assert genesis['en'].startswith('In the beginning, God created the heavens and the earth. '
                                  'The earth was formless and empty.')
  assert genesis['es'].startswith('EN el principio crió Dios los cielos y la tierra. '
                                  'Y la tierra estaba desordenada y vacía')
  assert genesis['last_verse'] == 4

  # The same examples again, built in another data dir.
  rebuilt = build(embedded.LongjaxBibleEnEs, tmp_path, 'verses_4')
  assert read_split(rebuilt, 'validation') == splits['validation']


@requires_sword
def test_bible_single_verses_are_all_aligned_pairs(make_data_config):
  config = make_data_config(dataset__name='longjax_bible_en_es', dataset__verses_per_example=1)
  sources.get_data_source(config.dataset, 'train')  # Builds it (shared with other tests).
  builder = sources.get_builder(config.dataset)
  total = sum(split.num_examples for split in builder.info.splits.values())
  english = sword.read_chapters(sword.find_module(sword.ENGLISH_MODULE))
  spanish = sword.read_chapters(sword.find_module(sword.SPANISH_MODULE))
  assert total == len(list(sword.align_verses(english, spanish))) > 31_000
  assert builder.info.metadata['english']['Copyright'] == 'PUBLIC DOMAIN'
  assert builder.info.metadata['spanish']['package'] == 'sword-text-sparv'


def test_bible_without_sword_modules_says_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv('SWORD_PATH', str(tmp_path / 'empty'))
  monkeypatch.setattr(sword, 'DEFAULT_LIBRARIES', ())
  builder = embedded.LongjaxBibleEnEs(data_dir=str(tmp_path), config='verses_1')
  with pytest.raises(sword.SwordModuleNotFoundError) as error:
    builder.download_and_prepare(file_format='array_record')
  assert 'apt-get install sword-text-web sword-text-sparv' in str(error.value)
  assert 'wmt14_translate/de-en' in str(error.value)
  assert not tfds.builder('longjax_bible_en_es/verses_1', data_dir=str(tmp_path)).is_prepared()
