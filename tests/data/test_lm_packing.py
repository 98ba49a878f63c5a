"""LM windows and packing: every token lands once, in its own segment, with its next token."""
import grain
import numpy as np
import pytest

from longjax.data import lm_examples

SEQ_LEN = 16
BOS, EOS = 2, 1


def random_documents(count, seed=0, max_length=40):
  rng = np.random.default_rng(seed)
  # Lengths from 0 (an empty document still yields bos -> eos) to several windows.
  return [rng.integers(3, 259, size=rng.integers(0, max_length)).astype(np.int32)
          for _ in range(count)]


@pytest.mark.parametrize('length', [0, 1, SEQ_LEN - 1, SEQ_LEN, SEQ_LEN + 1, 3 * SEQ_LEN + 5])
def test_document_pieces_cover_the_document_once(length):
  tokens = np.arange(length, dtype=np.int32) + 3
  pieces = lm_examples.document_pieces(tokens, SEQ_LEN)
  assert all(1 <= len(p['inputs']) <= SEQ_LEN for p in pieces)
  assert [len(p['inputs']) for p in pieces[:-1]] == [SEQ_LEN] * (len(pieces) - 1)
  inputs = np.concatenate([p['inputs'] for p in pieces])
  targets = np.concatenate([p['targets'] for p in pieces])
  np.testing.assert_array_equal(inputs, np.concatenate([[BOS], tokens]))
  np.testing.assert_array_equal(targets, np.concatenate([tokens, [EOS]]))
  assert all(p['weights'].dtype == np.float32 and (p['weights'] == 1).all() for p in pieces)


def rows_to_segments(rows):
  """Splits packed rows back into (inputs, targets) per segment, checking each row's masks."""
  segments = []
  for row in rows:
    ids = row['segment_ids']
    np.testing.assert_array_equal(row['weights'], (ids > 0).astype(np.float32))
    assert (row['inputs'][ids == 0] == 0).all() and (row['targets'][ids == 0] == 0).all()
    real = ids[ids > 0]
    # Segments are numbered 1, 2, ... in order, each one contiguous, padding at the end.
    assert (np.diff(real) >= 0).all() and (real[0] == 1 if len(real) else True)
    assert set(np.unique(real)) == set(range(1, real.max() + 1 if len(real) else 1))
    assert (ids[len(real):] == 0).all()
    for segment in np.unique(real):
      where = ids == segment
      np.testing.assert_array_equal(row['positions'][where], np.arange(where.sum()))
      segments.append((tuple(row['inputs'][where]), tuple(row['targets'][where])))
    assert (row['positions'][ids == 0] == 0).all()
  return segments


def expected_segments(documents):
  return [(tuple(p['inputs']), tuple(p['targets']))
          for doc in documents for p in lm_examples.document_pieces(doc, SEQ_LEN)]


def pieces_dataset(documents):
  return grain.experimental.FlatMapIterDataset(
      grain.MapDataset.source(documents).to_iter_dataset(), lm_examples.DocumentToPieces(SEQ_LEN))


def test_packing_keeps_every_piece_whole_and_separate():
  documents = random_documents(200)
  rows = list(lm_examples.pack_pieces(pieces_dataset(documents), SEQ_LEN, num_bins=8, seed=0,
                                      shuffle_bins=True))
  for row in rows:
    assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
        'inputs': ((SEQ_LEN,), np.int32), 'targets': ((SEQ_LEN,), np.int32),
        'weights': ((SEQ_LEN,), np.float32), 'segment_ids': ((SEQ_LEN,), np.int32),
        'positions': ((SEQ_LEN,), np.int32), 'global_mask': ((SEQ_LEN,), np.int32)}
    assert not row['global_mask'].any()  # plain text marks no global tokens
  assert sorted(rows_to_segments(rows)) == sorted(expected_segments(documents))
  # Packing is worth it: short documents share rows.
  assert len(rows) < len(expected_segments(documents)) * 0.8


def test_within_a_segment_the_target_is_the_next_input():
  documents = random_documents(100, seed=1)
  rows = list(lm_examples.pack_pieces(pieces_dataset(documents), SEQ_LEN, num_bins=4, seed=0,
                                      shuffle_bins=False))
  inner = 0
  for row in rows:
    ids = row['segment_ids']
    same_segment = (ids[:-1] > 0) & (ids[:-1] == ids[1:])
    np.testing.assert_array_equal(row['targets'][:-1][same_segment], row['inputs'][1:][same_segment])
    inner += same_segment.sum()
  assert inner > 0


def test_unpacked_rows_hold_one_piece_each():
  documents = random_documents(30, seed=2)
  rows = list(pieces_dataset(documents).map(lambda p: lm_examples.pad_piece(p, SEQ_LEN)))
  assert all(set(np.unique(row['segment_ids'])) <= {0, 1} for row in rows)
  assert rows_to_segments(rows) == expected_segments(documents)
