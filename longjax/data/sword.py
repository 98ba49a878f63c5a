"""Reads Bible text from installed SWORD zText modules, with no Bible library.

Debian packages the public-domain World English Bible (`sword-text-web`,
module `engWEB2015eb`) and Reina-Valera 1909 (`sword-text-sparv`, module
`spaRV1909eb`) as SWORD modules under /usr/share/sword. A zText module is, per
testament (`ot`, `nt`):

  - `.bzs`: one 12-byte record per zlib block: offset, compressed size,
    uncompressed size (little-endian uint32);
  - `.bzv`: one 10-byte record per *slot*: block number, offset in the
    uncompressed block (uint32) and size (uint16); size 0 = empty slot;
  - `.bzz`: the zlib blocks.

The slots follow the module's versification: slot 0 is empty, slot 1 holds
the testament heading, then each book has a heading slot and each chapter a
heading slot followed by one slot per verse. Rather than shipping the
versification tables, the chapter structure is read from the OSIS markup
itself: each chapter's heading slot holds `<chapter osisID="Gen.1" sID=.../>`,
the slots after it are its verses, and the slot just before the next book's
first chapter is that book's heading. (The WEB uses NRSVA versification and
the RV1909 KJV versification; they agree on the 1,189 chapters of the 66 books
they share, and on the verse count of all but 2 chapters; see `align_verses`.)
"""
from __future__ import annotations

import configparser
import dataclasses
import html
import math
import os
import re
import struct
import zlib
from typing import Iterator, Optional

ENGLISH_MODULE = 'engWEB2015eb'
SPANISH_MODULE = 'spaRV1909eb'
DEBIAN_PACKAGES = {ENGLISH_MODULE: 'sword-text-web', SPANISH_MODULE: 'sword-text-sparv'}

# SWORD's own search order for module libraries: $SWORD_PATH, the user's, the system's.
DEFAULT_LIBRARIES = ('~/.sword', '/usr/share/sword', '/usr/local/share/sword')

_CHAPTER_MARK = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"')
_BOOK_DIV = re.compile(r'<div\b[^>]*\btype="book"')
# Footnotes and editors' headings are not verse text (the two translations have
# different ones); canonical titles (the psalms' superscriptions) are.
_DROPPED_ELEMENTS = re.compile(
    r'<(note|title)\b(?![^>]*canonical="true")[^>]*(?<!/)>.*?</\1>', re.DOTALL)
# A dropped footnote between two words stood for a space ("God<note/>created").
_DROPPED = '\x00'
_DROPPED_BETWEEN_WORDS = re.compile(r'(?<=\w)\x00+(?=\w)')
_TAG = re.compile(r'<[^>]*>')
_SPACES = re.compile(r'\s+')

# Verse pairing (see `align_verses`): a chapter's verses are shifted only when
# that lowers the mean |log length ratio| by this much, and pairs whose ratio
# is beyond e^1.1 = 3x are dropped (the 99.9th percentile is 1.9x).
MIN_OFFSET_GAIN = 0.1
MAX_LENGTH_MISMATCH = 1.1


class SwordModuleNotFoundError(FileNotFoundError):
  """A SWORD module is not installed; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class SwordModule:
  name: str
  data_dir: str  # Folder with {ot,nt}.{bzs,bzv,bzz}.
  conf: dict  # The module's .conf entries (Version, Copyright, ...).


def library_dirs() -> list[str]:
  dirs = [os.environ['SWORD_PATH']] if os.environ.get('SWORD_PATH') else []
  return dirs + [os.path.expanduser(d) for d in DEFAULT_LIBRARIES]


def find_module(name: str, libraries: Optional[list[str]] = None) -> SwordModule:
  """Locates an installed module by its .conf file in mods.d."""
  for library in libraries or library_dirs():
    # SWORD names .conf files in lower case, Debian keeps the module's case.
    candidates = [os.path.join(library, 'mods.d', base + '.conf') for base in (name, name.lower())]
    conf_path = next((path for path in candidates if os.path.exists(path)), None)
    if conf_path is None:
      continue
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # Keep SWORD's capitalised keys.
    with open(conf_path, encoding='utf-8') as f:
      parser.read_string(f.read())
    conf = dict(parser[parser.sections()[0]])
    return SwordModule(name, os.path.normpath(os.path.join(library, conf['DataPath'])), conf)
  packages = ' '.join(DEBIAN_PACKAGES.values())
  raise SwordModuleNotFoundError(
      f'SWORD module {name!r} is not installed (searched {libraries or library_dirs()}). '
      f'Install it with `apt-get install {packages}` (Debian/Ubuntu), or train on '
      "a tfds translation dataset instead, e.g. config.dataset.name = 'wmt14_translate/de-en'.")


def read_slots(module: SwordModule, testament: str) -> list[str]:
  """All slots of one testament ('ot' or 'nt'), as raw OSIS strings ('' = empty)."""
  def read(extension):
    with open(os.path.join(module.data_dir, f'{testament}.{extension}'), 'rb') as f:
      return f.read()

  blocks_index, slots_index, compressed = read('bzs'), read('bzv'), read('bzz')
  blocks = {}
  slots = []
  for block, start, size in struct.iter_unpack('<IIH', slots_index):
    if size == 0:
      slots.append('')
      continue
    if block not in blocks:
      offset, compressed_size, _ = struct.unpack_from('<III', blocks_index, 12 * block)
      blocks[block] = zlib.decompress(compressed[offset:offset + compressed_size])
    slots.append(blocks[block][start:start + size].decode('utf-8'))
  return slots


def plain_text(osis: str) -> str:
  """Verse text without markup, footnotes or headings, whitespace collapsed."""
  text = _TAG.sub('', _DROPPED_ELEMENTS.sub(_DROPPED, osis))
  text = _DROPPED_BETWEEN_WORDS.sub(' ', text).replace(_DROPPED, '')
  return _SPACES.sub(' ', html.unescape(text)).strip()


def read_chapters(module: SwordModule, testaments=('ot', 'nt')) -> dict[str, list[str]]:
  """Maps each chapter's OSIS id ('Gen.1') to its verses' plain text, in order."""
  chapters = {}
  for testament in testaments:
    slots = read_slots(module, testament)
    # A slot can hold several chapter marks when a module has empty chapters
    # (the WEB's Greek Daniel); only the last one is followed by verses.
    marks = [(index, chapter) for index, slot in enumerate(slots)
             for chapter in _CHAPTER_MARK.findall(slot)]
    for position, (slot_index, chapter) in enumerate(marks):
      if position + 1 < len(marks):
        next_index, next_chapter = marks[position + 1]
        end = next_index
        if (next_chapter.split('.')[0] != chapter.split('.')[0]
            and not _BOOK_DIV.search(slots[next_index])):
          end -= 1  # The next book's heading slot, unless it holds the mark itself.
      else:
        end = len(slots)
      verses = slots[slot_index + 1:max(end, slot_index + 1)]
      chapters[chapter] = [plain_text(verse) for verse in verses]
  return chapters


@dataclasses.dataclass(frozen=True)
class VersePair:
  book: str  # OSIS book id, e.g. 'Gen'.
  chapter: int
  verse: int
  english: str
  spanish: str


def _length_mismatch(english: str, spanish: str) -> float:
  """|log| of the length ratio, smoothed so that very short verses weigh less."""
  return abs(math.log((len(english) + 20) / (len(spanish) + 20)))


def chapter_offset(english: list[str], spanish: list[str]) -> int:
  """How far the English verse numbers run ahead of the Spanish ones (-1, 0 or 1).

  Some chapters are numbered differently in the two modules (the WEB module
  follows the Hebrew numbering in e.g. Numbers 13, 1 Samuel 24, Hosea 12 and
  Jonah 2, where 12:16 of KJV Numbers is 13:1 of the WEB). The offset is the
  one under which paired verses have the most similar lengths, kept only if it
  is clearly better than 0.
  """
  def mismatch(offset):
    scores = [_length_mismatch(english[i + offset], spanish[i]) for i in range(len(spanish))
              if 0 <= i + offset < len(english) and english[i + offset] and spanish[i]]
    return sum(scores) / len(scores) if len(scores) >= 2 else math.inf

  best = min((-1, 0, 1), key=mismatch)
  return best if mismatch(best) < mismatch(0) - MIN_OFFSET_GAIN else 0


def align_verses(english: dict[str, list[str]], spanish: dict[str, list[str]]) -> Iterator[VersePair]:
  """Pairs the verses of the chapters both modules have, in the Spanish (KJV) book order.

  Verses are paired by number after `chapter_offset`; pairs whose lengths
  disagree by more than MAX_LENGTH_MISMATCH (versification splits and merges,
  and the WEB glossary that its last verse slot carries) and verses empty on
  either side are dropped. Verse numbers are the Spanish module's.
  """
  for chapter, spanish_verses in spanish.items():
    english_verses = english.get(chapter)
    if english_verses is None:
      continue
    book, chapter_number = chapter.split('.')
    offset = chapter_offset(english_verses, spanish_verses)
    for index, es in enumerate(spanish_verses):
      en = english_verses[index + offset] if 0 <= index + offset < len(english_verses) else ''
      if en and es and _length_mismatch(en, es) <= MAX_LENGTH_MISMATCH:
        yield VersePair(book, int(chapter_number), index + 1, en, es)
