"""A real tfds builder (scientific_papers) writes long array_record examples offline; the
pipeline reads them back under the real name with tfds.data_source.

The fixture subclasses the registered builder and replaces only its download: it writes
files in the dataset's own JSON-lines format (from stdlib modules and their docstrings)
and lets the real `_split_generators`/`_generate_examples` parse them.
"""
import ast
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from longjax import data
from longjax.data import sources
from longjax.data import stdlib_corpus
from longjax.data import tokenizers

MODULES = {
    'train': ['json/decoder.py', 'json/encoder.py', 'csv.py', 'textwrap.py', 'heapq.py',
              'bisect.py'],
    'val': ['difflib.py', 'shlex.py', 'fnmatch.py'],
    'test': ['glob.py', 'string.py', 'calendar.py'],
}


def scientific_papers_record(path):
  """One line of the arxiv-dataset files: article paragraphs, abstract sentences in <S> tags."""
  text = stdlib_corpus.read_source(stdlib_corpus.stdlib_dir(), path)
  docstring = ast.get_docstring(ast.parse(text))
  return {
      'article_id': path,
      'article_text': [paragraph for paragraph in text.split('\n\n') if paragraph.strip()],
      'abstract_text': [f'<S> {line} </S>' for line in docstring.splitlines() if line.strip()],
      'section_names': ['code'],
  }


class FakeDownloadManager:

  def __init__(self, folder):
    self.folder = folder

  def download_and_extract(self, urls):
    return {name: self.folder for name in urls}


@pytest.fixture(scope='module')
def arxiv_dir(tmp_path_factory):
  sources.register_tfds_builders()
  real_builder = tfds.builder_cls('scientific_papers')
  root = tmp_path_factory.mktemp('arxiv')
  extracted = root / 'extracted'
  (extracted / 'arxiv-dataset').mkdir(parents=True)
  for split, paths in MODULES.items():
    with open(extracted / 'arxiv-dataset' / f'{split}.txt', 'w', encoding='utf-8') as f:
      for path in paths:
        f.write(json.dumps(scientific_papers_record(path)) + '\n')

  class OfflineScientificPapers(real_builder, skip_registration=True):
    name = 'scientific_papers'

    def _split_generators(self, dl_manager):
      del dl_manager
      return super()._split_generators(FakeDownloadManager(str(extracted)))

  data_dir = root / 'tfds'
  OfflineScientificPapers(data_dir=str(data_dir), config='arxiv').download_and_prepare(
      file_format='array_record')
  return str(data_dir)


def expected_articles(split):
  return ['\n'.join(scientific_papers_record(path)['article_text']) for path in MODULES[split]]


def test_fixture_reads_back_under_the_real_name_as_bytes(arxiv_dir):
  source = tfds.data_source('scientific_papers/arxiv', split='validation', data_dir=arxiv_dir)
  assert len(source) == 3
  articles = sorted(source[i]['article'] for i in range(3))
  assert all(isinstance(article, bytes) for article in articles)
  assert [a.decode('utf-8') for a in articles] == sorted(expected_articles('val'))
  assert min(len(a) for a in articles) > 5_000  # Long documents, unlike the mocks.


def test_summarization_batches_from_the_fixture(arxiv_dir, make_data_config):
  config = make_data_config(dataset__name='scientific_papers/arxiv', dataset__data_dir=arxiv_dir,
                            dataset__input_key='article', dataset__target_key='abstract',
                            seq_len=256, target_len=64, batch_size=2)
  tokenizer = tokenizers.ByteTokenizer()
  batches = list(data.build_eval_iterator(config, tokenizer, process_index=0, process_count=1,
                                          with_text=True))
  assert len(batches) == 2  # 3 examples, batches of 2, the last one padded.
  articles = set(expected_articles('val'))
  for batch in batches:
    assert batch['inputs'].shape == (2, 256) and batch['targets'].shape == (2, 64)
    for row, text in enumerate(batch['inputs_text']):
      if not text:
        assert batch['weights'][row].sum() == 0
        continue
      assert text in articles
      # Source: the first 255 bytes of the article, then eos, filling the row exactly.
      source_bytes = batch['inputs'][row][:-1] - 3
      assert bytes(source_bytes.astype(np.uint8)) == text.encode('utf-8')[:255]
      assert batch['inputs'][row][-1] == tokenizer.eos_id
      assert '<S>' not in batch['targets_text'][row]  # The real builder's own cleaning.
      assert tokenizer.decode(batch['targets'][row]) == batch['targets_text'][row][:63]
  train = next(data.build_train_iterator(config, tokenizer, process_index=0, process_count=1))
  assert (train['inputs_segment_ids'].sum(axis=1) == 256).all()  # Long inputs fill the source.


def test_long_documents_are_cut_into_windows(arxiv_dir, make_data_config):
  config = make_data_config(dataset__name='scientific_papers/arxiv', dataset__data_dir=arxiv_dir,
                            dataset__input_key='article', seq_len=128, batch_size=4)
  tokenizer = tokenizers.ByteTokenizer()
  batches = list(data.build_eval_iterator(config, tokenizer, process_index=0, process_count=1))
  # Every (input, next token) pair of every document is counted exactly once.
  expected_pairs = sum(len(article.encode('utf-8')) + 1 for article in expected_articles('val'))
  assert sum(batch['weights'].sum() for batch in batches) == expected_pairs
  full_rows = sum(int((batch['segment_ids'] == 1).all(axis=1).sum()) for batch in batches)
  assert full_rows >= expected_pairs // 128 - 3  # All but each document's last window.

  train = data.build_train_iterator(config, tokenizer, process_index=0, process_count=1)
  articles = [article.encode('utf-8') for article in expected_articles('train')]
  sources_of_rows = []
  for batch in (next(train) for _ in range(10)):
    for row, ids in zip(batch['inputs'], batch['segment_ids']):
      if (ids == 1).all():  # A full window of one document.
        window = bytes((row[row > 2] - 3).astype(np.uint8))
        sources_of_rows.append([i for i, article in enumerate(articles) if window in article])
  assert all(len(found) == 1 for found in sources_of_rows)
  # Windows of several documents alternate: no document fills the first 40 rows.
  assert len({found[0] for found in sources_of_rows}) >= 4
