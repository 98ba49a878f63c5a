"""`longjax_pydocs`: Python source -> its docstring, from the stdlib, with `ast`.

Two kinds of pairs from the same files as `longjax_pystdlib` (and the same
train/validation split by file):
  - every documented function, async function and class: its source
    (decorators included, dedented) -> its docstring (8,039 pairs for
    CPython 3.11; source median 438 characters, 1,990 over 1,000);
  - every documented module: the whole file -> the module docstring (562
    long pairs; median 10.6k characters).
All docstrings are removed from the source side, nested ones too, so a class's
methods do not give its summary away. Features: `source`, `docstring`,
`name` (qualified, e.g. 'json.decoder.JSONDecoder'), `kind` ('module',
'class', 'function', 'async_function') and `path`.

Configs: `all` (default) and `modules` (only the long module pairs, for
long-input summarization).
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from longjax.data import stdlib_corpus
from longjax.data.embedded import pystdlib

ALL_KINDS = ('module', 'class', 'function', 'async_function')


@dataclasses.dataclass
class PydocsConfig(pystdlib.StdlibConfig):
  kinds: tuple[str, ...] = ALL_KINDS


class LongjaxPydocs(tfds.core.GeneratorBasedBuilder):
  """Python stdlib definitions and modules paired with their docstrings."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      PydocsConfig(name='all', description='Functions, classes and modules.'),
      PydocsConfig(name='modules', kinds=('module',), description='Whole modules only (long inputs).'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = pystdlib.source_metadata(self.builder_config)
    metadata['kinds'] = list(self.builder_config.kinds)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'source': tfds.features.Text(),
            'docstring': tfds.features.Text(),
            'name': tfds.features.Text(),
            'kind': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        supervised_keys=('source', 'docstring'),
        homepage='https://docs.python.org/3/library/ast.html',
        license=metadata['license'],
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return pystdlib.split_generators(self.builder_config, self._generate_examples)

  def _generate_examples(self, root, paths):
    kinds = set(self.builder_config.kinds)
    for path in paths:
      text = stdlib_corpus.read_source(root, path)
      if not text:
        continue
      for index, pair in enumerate(stdlib_corpus.extract_docstring_pairs(text, path)):
        if pair.kind in kinds:
          yield f'{path}#{index}', {'source': pair.source, 'docstring': pair.docstring,
                                    'name': pair.name, 'kind': pair.kind, 'path': path}
