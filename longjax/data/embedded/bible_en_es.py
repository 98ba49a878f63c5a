"""`longjax_bible_en_es`: World English Bible -> Reina-Valera 1909, verse-aligned.

Both translations are in the public domain and come from the Debian packages
`sword-text-web` and `sword-text-sparv` (decoded by `longjax.data.sword`):
31,067 aligned verse pairs over the 66 books both contain (en 3.9 MB, es 3.8
MB). An example concatenates `verses_per_example` consecutive verses of one
chapter (the last group of a chapter may be shorter), so the config sets the
input length: configs `verses_1` ... `verses_64`; `BibleConfig` makes others.

Split by book (a hash of the OSIS book id, as for the stdlib datasets):
validation = 1 Samuel, 2 Samuel, Zechariah, Titus, 2 John (5.7% of verses);
test = 1 Kings, Malachi, Romans, 2 Corinthians, Colossians (5.3%); the rest
is train. Features: `en`, `es`, `book`, `chapter`, `first_verse`,
`last_verse` (verse numbers of the Spanish module, KJV versification).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from longjax.data import stdlib_corpus
from longjax.data import sword

VERSES_PER_EXAMPLE = (1, 2, 4, 8, 16, 32, 64)
_LICENSE = 'Public domain (both modules\' Copyright field: "PUBLIC DOMAIN").'


@dataclasses.dataclass
class BibleConfig(tfds.core.BuilderConfig):
  verses_per_example: int = 1


def config_for(verses_per_example: int) -> BibleConfig:
  """The predefined config for this many verses, or a new one."""
  for config in LongjaxBibleEnEs.BUILDER_CONFIGS:
    if config.verses_per_example == verses_per_example:
      return config
  if verses_per_example < 1:
    raise ValueError(f'verses_per_example must be >= 1, got {verses_per_example}.')
  return BibleConfig(name=f'verses_{verses_per_example}', verses_per_example=verses_per_example)


def split_of_book(book: str) -> str:
  residue = stdlib_corpus.path_hash(book) % 10
  return {0: 'validation', 5: 'test'}.get(residue, 'train')


def _module_metadata(name: str) -> dict:
  """Where the module is and what its .conf says, or why it is missing."""
  try:
    module = sword.find_module(name)
  except sword.SwordModuleNotFoundError as error:
    return {'missing': str(error)}
  return {'data_dir': module.data_dir, 'package': sword.DEBIAN_PACKAGES[name],
          **{key: module.conf.get(key, '') for key in ('Description', 'Version', 'Copyright',
                                                       'Versification')}}


class LongjaxBibleEnEs(tfds.core.GeneratorBasedBuilder):
  """English -> Spanish Bible translation from the installed SWORD modules."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      BibleConfig(name=f'verses_{n}', verses_per_example=n,
                  description=f'{n} consecutive verse(s) of a chapter per example.')
      for n in VERSES_PER_EXAMPLE]
  DEFAULT_BUILDER_CONFIG_NAME = 'verses_4'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'en': tfds.features.Text(),
            'es': tfds.features.Text(),
            'book': tfds.features.Text(),
            'chapter': tfds.features.Scalar(dtype=np.int32),
            'first_verse': tfds.features.Scalar(dtype=np.int32),
            'last_verse': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('en', 'es'),
        homepage='https://ebible.org/web/',
        license=_LICENSE,
        metadata=tfds.core.MetadataDict(
            source='SWORD zText modules installed by Debian packages',
            english=_module_metadata(sword.ENGLISH_MODULE),
            spanish=_module_metadata(sword.SPANISH_MODULE),
            license=_LICENSE),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    # Raises SwordModuleNotFoundError (with the apt-get line) when missing.
    english = sword.read_chapters(sword.find_module(sword.ENGLISH_MODULE))
    spanish = sword.read_chapters(sword.find_module(sword.SPANISH_MODULE))
    pairs = list(sword.align_verses(english, spanish))
    return {split: self._generate_examples([p for p in pairs if split_of_book(p.book) == split])
            for split in ('train', 'validation', 'test')}

  def _generate_examples(self, pairs):
    group_size = self.builder_config.verses_per_example
    chapter_groups = {}
    for pair in pairs:
      chapter_groups.setdefault((pair.book, pair.chapter), []).append(pair)
    for (book, chapter), verses in chapter_groups.items():
      for start in range(0, len(verses), group_size):
        group = verses[start:start + group_size]
        yield f'{book}.{chapter}.{group[0].verse}', {
            'en': ' '.join(v.english for v in group),
            'es': ' '.join(v.spanish for v in group),
            'book': book,
            'chapter': chapter,
            'first_verse': group[0].verse,
            'last_verse': group[-1].verse,
        }
