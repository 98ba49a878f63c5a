"""Packing never changes a result: a document's logits (LM) or encodings
(encoder) are the same alone and packed behind other documents, at any offset,
with padding, for every attention kind — global tokens, summary blocks,
hierarchy groups and chunks are all aligned to the document. (A kind whose
registry entry says it is aligned to the row, multiresolution, is exact for a
row's first document only; runs refuse packed data for it.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax import attention, models
from longjax.models import testing

DOC = 37  # not a multiple of any tiny block (4) or window
OFFSETS = (5, 13, 30)  # the document's first position in the packed row
ROW = 80


def _packed(doc, offset, rng):
  """A row: other documents in [0, offset), the document, another, then padding."""
  ids = rng.integers(3, 50, size=ROW).astype(np.int32)
  seg = np.zeros(ROW, np.int32)
  pos = np.zeros(ROW, np.int32)
  cuts = sorted({0, offset // 2, offset}) if offset > 3 else sorted({0, offset})
  seg_id = 1
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    seg[lo:hi], pos[lo:hi] = seg_id, np.arange(hi - lo)
    seg_id += 1
  end = offset + DOC
  ids[offset:end], seg[offset:end], pos[offset:end] = doc, seg_id, np.arange(DOC)
  tail = end + 9  # one more document, then padding (segment 0)
  seg[end:tail], pos[end:tail] = seg_id + 1, np.arange(tail - end)
  ids[tail:] = 0
  return ids[None], seg[None], pos[None]


def _offsets(kind):
  return OFFSETS if attention.spec(kind).segment_aligned else (0,)


def _model(kind, arch, positions):
  config = testing.tiny_model_config(kind, arch=arch, positions=positions)
  return models.build(config, rngs=nnx.Rngs(0))


CASES = [(kind, positions) for kind in attention.KINDS for positions in ('rope', 't5_bias')]
CASES += [('chunked', 'learned'), ('global_local', 'learned')]


@pytest.mark.parametrize('kind,positions', CASES)
def test_lm_document_alone_equals_packed(kind, positions):
  model = _model(kind, 'lm', positions)
  fn = jax.jit(lambda ids, seg, pos: model(ids, segment_ids=seg, positions=pos)[0])
  rng = np.random.default_rng(0)
  doc = rng.integers(3, 50, size=DOC).astype(np.int32)
  alone = np.asarray(jax.jit(lambda ids: model(ids)[0])(doc[None]))[0]
  for offset in _offsets(kind):
    ids, seg, pos = _packed(doc, offset, rng)
    packed = np.asarray(fn(ids, seg, pos))[0, offset:offset + DOC]
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5,
                               err_msg=f'{kind} {positions} offset {offset}')


@pytest.mark.parametrize('kind', attention.KINDS)
def test_encoder_document_alone_equals_packed(kind):
  model = _model(kind, 'encoder_decoder', 't5_bias')
  encode = jax.jit(lambda ids, seg, pos: model.encode(ids, segment_ids=seg, positions=pos)[0])
  rng = np.random.default_rng(1)
  doc = rng.integers(3, 50, size=DOC).astype(np.int32)
  alone = np.asarray(encode(doc[None], jnp.ones((1, DOC), jnp.int32),
                            jnp.arange(DOC)[None]))[0]
  for offset in _offsets(kind):
    ids, seg, pos = _packed(doc, offset, rng)
    packed = np.asarray(encode(ids, seg, pos))[0, offset:offset + DOC]
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5,
                               err_msg=f'{kind} offset {offset}')
