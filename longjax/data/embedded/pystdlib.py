"""`longjax_pystdlib`: the Python standard library's source files as long documents.

One example per non-test `.py` file of the running interpreter's stdlib (733
files, 12.1 MB for CPython 3.11; median 7.8 KB, largest 757 KB), split
train/validation by a hash of the file's path (see `stdlib_corpus`). Features:
`text` (the file) and `path` (relative to the stdlib folder). The Python
version and folder it was built from are in `builder.info.metadata`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import tensorflow_datasets as tfds

from longjax.data import stdlib_corpus

_LICENSE = 'PSF-2.0 (the Python Software Foundation License), as the interpreter it comes with.'


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
  """Which stdlib files: `max_files` keeps a fixed sample (for tests), None = all."""
  max_files: Optional[int] = None
  stdlib_dir: Optional[str] = None  # None = the running interpreter's.


def source_metadata(config: StdlibConfig) -> tfds.core.MetadataDict:
  return tfds.core.MetadataDict(
      source='Python standard library of the interpreter that built this dataset',
      python_version=stdlib_corpus.python_version(),
      stdlib_dir=config.stdlib_dir or stdlib_corpus.stdlib_dir(),
      max_files=config.max_files,
      license=_LICENSE)


def split_generators(config: StdlibConfig, generate_examples) -> dict:
  """{split: generate_examples(root, paths of that split)} over the files `config` selects.

  Shared with `longjax_pydocs`, which reads the same files with the same split.
  """
  root = config.stdlib_dir or stdlib_corpus.stdlib_dir()
  paths = stdlib_corpus.list_source_files(root, config.max_files)
  return stdlib_corpus.split_generators(
      paths, lambda split_paths: generate_examples(root, split_paths))


class LongjaxPystdlib(tfds.core.GeneratorBasedBuilder):
  """Python stdlib source files (non-test), one document per file."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [StdlibConfig(name='full', description='All non-test stdlib files.')]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        homepage='https://docs.python.org/3/library/',
        license=_LICENSE,
        metadata=source_metadata(self.builder_config),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return split_generators(self.builder_config, self._generate_examples)

  def _generate_examples(self, root, paths):
    for path in paths:
      text = stdlib_corpus.read_source(root, path)
      if text:
        yield path, {'text': text, 'path': path}
