"""The SWORD zText reader: index layout, markup stripping, verse alignment."""
import os

import pytest

from tests.data.data_testing import requires_sword
from longjax.data import sword

# KJV versification (the Spanish module's): books, chapters and verses per testament.
KJV = {'ot': (39, 929, 23145), 'nt': (27, 260, 7957)}


def test_plain_text_drops_notes_and_headings_but_keeps_canonical_titles():
  osis = ('<title type="x-heading">A heading</title><w lemma="strong:H430">God</w>'
          '<note placement="foot"><reference>1:1</reference>a footnote</note><w>created</w>, '
          '<transChange type="added">and</transChange>  &amp; <title canonical="true" '
          'type="psalm">A Psalm.</title><milestone type="x-p"/> more.')
  assert sword.plain_text(osis) == 'God created, and & A Psalm. more.'


def test_a_footnote_before_punctuation_leaves_no_space():
  assert sword.plain_text('Behold<note>x</note>, it was good.') == 'Behold, it was good.'


def test_chapter_offset_finds_shifted_numbering():
  english = ['x' * n for n in (30, 200, 40, 150, 60, 90)]
  spanish = ['y' * n for n in (80, 30, 200, 40, 150, 60)]  # Spanish verse 2 = English verse 1.
  assert sword.chapter_offset(english, spanish) == -1
  assert sword.chapter_offset(english, english) == 0


def test_missing_module_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv('SWORD_PATH', str(tmp_path))
  with pytest.raises(sword.SwordModuleNotFoundError) as error:
    sword.find_module('engWEB2015eb', libraries=[str(tmp_path)])
  message = str(error.value)
  assert 'apt-get install sword-text-web sword-text-sparv' in message
  assert 'wmt14_translate/de-en' in message


@requires_sword
@pytest.mark.parametrize('testament', ['ot', 'nt'])
def test_slots_follow_the_kjv_layout(testament):
  module = sword.find_module(sword.SPANISH_MODULE)
  slots = sword.read_slots(module, testament)
  assert len(slots) * 10 == os.path.getsize(os.path.join(module.data_dir, f'{testament}.bzv'))
  chapters = sword.read_chapters(module, testaments=(testament,))
  books = {chapter.split('.')[0] for chapter in chapters}
  verses = sum(len(v) for v in chapters.values())
  assert (len(books), len(chapters), verses) == KJV[testament]
  # Slot 0, the testament heading, one heading per book and chapter, then verses.
  assert 2 + len(books) + len(chapters) + verses == len(slots)


@requires_sword
def test_known_verses_align():
  english = sword.read_chapters(sword.find_module(sword.ENGLISH_MODULE))
  spanish = sword.read_chapters(sword.find_module(sword.SPANISH_MODULE))
  pairs = {(p.book, p.chapter, p.verse): p for p in sword.align_verses(english, spanish)}
  assert 31_000 < len(pairs) < 31_102  # KJV has 31,102 verses; a few do not pair.
  assert len({book for book, _, _ in pairs}) == 66
  genesis = pairs[('Gen', 1, 1)]
  assert genesis.english == 'In the beginning, God created the heavens and the earth.'
  assert genesis.spanish == 'EN el principio crió Dios los cielos y la tierra.'
  assert pairs[('John', 11, 35)].english == 'Jesus wept.'
  assert pairs[('John', 11, 35)].spanish == 'Y lloró Jesús.'
  # Numbers 13 is numbered one ahead in the WEB module; the offset pairs it right.
  assert pairs[('Num', 13, 2)].english.startswith('Yahweh spoke to Moses')
  assert pairs[('Num', 13, 2)].spanish.startswith('Y Jehová habló á Moisés')
  for pair in pairs.values():
    assert '<' not in pair.english + pair.spanish and '  ' not in pair.english
