"""The RULER-style suite (longjax/data/ruler.py): each answer is what an
independent solver reads off the row's text, rows are reproducible, the
needle depth is where the config puts it, the question alone is global."""
import collections
import re

import numpy as np
import pytest

from longjax.data import ruler
from longjax.data import synthetic
from tests.data.test_synthetic_tasks import (TOKENIZER, answers, assert_lm_row,
                                             assert_question_is_global, task, text_of)

K, V, W = ruler.KEY_LEN, ruler.VALUE_LEN, ruler.WORD_LEN
NEEDLE = re.compile(r'\|([a-z]{%d})=(\w+)\|' % K)


def _needles(body):
  return [(m.group(1), m.group(2), m.start()) for m in NEEDLE.finditer(body)]


def solve(name, text, settings):
  """The answer text, from the row's text S (after bos) by the task's rule."""
  body, question = text[:text.rindex('?')], text[text.rindex('?') + 1:]
  needles = _needles(body)
  if name in ('niah_single', 'niah_multikey'):
    key = question[:K]
    values = [v for k, v, _ in needles if k == key]
    assert len(values) == 1
    return values[0]
  if name == 'niah_multivalue':
    key = question[:K]
    return ''.join(v for k, v, _ in needles if k == key)
  if name == 'niah_multiquery':
    table = {k: v for k, v, _ in needles}
    asked = re.findall(r'([a-z]{%d})=' % K, question)
    return ''.join(table[k] for k in asked)
  if name == 'variable_tracking':
    value = question[:V]
    assigned, chain = {}, []
    for k, v, _ in needles:
      assigned[k] = v
    current = value
    while True:  # follow the chain: who is assigned the current value / variable?
      names = [k for k, v in assigned.items() if v == current]
      if not names:
        return ''.join(chain)
      assert len(names) == 1
      chain.append(names[0])
      current = names[0]
  words = body.split()
  counts = collections.Counter(words)
  if name == 'common_words':
    repeated = [w for w in dict.fromkeys(words) if counts[w] == settings['word_repeats']]
    return ''.join(repeated)
  if name == 'frequent_words':
    order = {w: i for i, w in reversed(list(enumerate(words)))}
    ranked = sorted(counts, key=lambda w: (-counts[w], order[w]))
    return ''.join(ranked[:settings['num_frequent']])
  raise AssertionError(name)


SETTINGS = dict(num_needles=4, num_values=3, num_queries=2, num_chains=3, hops=3,
                num_common=3, word_repeats=3, num_frequent=3)


@pytest.mark.parametrize('seq_len', [128, 1000])
@pytest.mark.parametrize('name', sorted(ruler.TASKS))
def test_answer_is_what_the_text_says(make_data_config, name, seq_len):
  overrides = {f'synthetic__{k}': v for k, v in SETTINGS.items()}
  generated = task(make_data_config, name, seq_len=seq_len, **overrides)
  for index in range(12):
    row = generated[index]
    assert_lm_row(row, seq_len)
    text = text_of(row)
    assert len(text) == seq_len
    want = solve(name, text, SETTINGS)
    assert answers(row) == want, text
    if name.startswith('niah') or name == 'variable_tracking':
      assert len(_needles(text[:text.rindex('?')])) == {
          'niah_single': 1, 'niah_multikey': 4, 'niah_multivalue': 3,
          'niah_multiquery': 4, 'variable_tracking': 9}[name]


def test_multiquery_weights_only_the_values(make_data_config):
  row = task(make_data_config, 'niah_multiquery', seq_len=200, synthetic__num_queries=3)[0]
  question = text_of(row)[text_of(row).rindex('?') + 1:]
  assert re.fullmatch(r'[a-z]{3}=\d{4};[a-z]{3}=\d{4};[a-z]{3}=\d{4}', question), question
  assert row['weights'].sum() == 3 * V


@pytest.mark.parametrize('name', sorted(ruler.TASKS))
def test_reproducible_and_splits_differ(make_data_config, name):
  a, b = task(make_data_config, name, seq_len=300), task(make_data_config, name, seq_len=300)
  for key in a[5]:
    np.testing.assert_array_equal(a[5][key], b[5][key])
  assert text_of(a[5]) != text_of(a[6])
  assert text_of(a[5]) != text_of(task(make_data_config, name, seq_len=300, split='eval')[5])


@pytest.mark.parametrize('name', ['niah_single', 'niah_multikey'])
def test_needle_depth_places_the_asked_needle(make_data_config, name):
  for depth in (0.0, 0.5, 1.0):
    row = task(make_data_config, name, seq_len=400, synthetic__needle_depth=depth)[2]
    text = text_of(row)
    key = text[text.rindex('?') + 1:][:K]
    start = [s for k, _, s in _needles(text) if k == key][0]
    others = sum(len(k) + len(v) + 3 for k, v, s in _needles(text) if s < start)
    hay = len(text) - sum(len(k) + len(v) + 3 for k, v, _ in _needles(text)) \
        - (len(text) - text.rindex('?'))
    assert start - others == round(depth * hay), (depth, start, others, hay)


@pytest.mark.parametrize('answers_too', [False, True])
@pytest.mark.parametrize('name', sorted(ruler.TASKS))
def test_global_mask_is_the_question(make_data_config, name, answers_too):
  row = task(make_data_config, name, seq_len=256, synthetic__global_answers=answers_too)[1]
  assert_question_is_global(row, 256, answers_too=answers_too)
  if not answers_too:
    assert not row['global_mask'][row['weights'] > 0][1:].any()


def test_text_filler_hides_needles_in_corpus_text(make_data_config):
  filler = TOKENIZER.encode_to_array('def f(x=1): return x | 2  # a? b;\n' * 40)
  config = make_data_config(dataset__name='niah_single', synthetic__filler='text')
  row = synthetic.make_task(config, TOKENIZER, split='train', seq_len=300,
                            filler_tokens=filler)[0]
  text = text_of(row)
  assert 'return x' in text and len(_needles(text)) == 1
  assert answers(row) == solve('niah_single', text, SETTINGS)


@pytest.mark.parametrize('field, value, name', [
    ('needle_depth', 1.5, 'niah_single'), ('num_needles', 0, 'niah_multikey'),
    ('num_queries', 9, 'niah_multiquery'), ('hops', 0, 'variable_tracking'),
    ('word_repeats', 1, 'common_words'), ('num_frequent', 0, 'frequent_words')])
def test_bad_settings_name_the_field(make_data_config, field, value, name):
  with pytest.raises(ValueError, match=f'synthetic.{field}'):
    make_data_config(dataset__name=name, **{f'synthetic__{field}': value})


def test_too_short_rows_say_what_they_need(make_data_config):
  with pytest.raises(ValueError, match='too short'):
    task(make_data_config, 'niah_multikey', seq_len=20)[0]
  with pytest.raises(ValueError, match='words'):
    task(make_data_config, 'common_words', seq_len=30)[0]
