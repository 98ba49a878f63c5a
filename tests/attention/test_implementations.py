"""Routing: which implementation computes a call, on each backend (CPU only).

`implementations.for_backend` routes as if on a GPU or TPU; `jax.eval_shape`
traces the call without running it. On this host jax's cuDNN path gets as far
as its runtime check ("cuDNN is not detected"), which it reaches only after
accepting the call's shapes, dtypes and window, so reaching it is a pass.
"""
import itertools

import jax
import jax.numpy as jnp
import pytest
from absl import logging

from longjax import attention, sharding
from longjax.attention import implementations
from tests.attention.cases import CASES, make_segments

# One case per kind (the kernels' own settings).
KIND_CASES = {}
for _name, _case in sorted(CASES.items()):
  KIND_CASES.setdefault(_case.kind, _case)


def _trace(case, dtype, causal, segments, implementation='auto', length=64, head_dim=64):
  q = jax.ShapeDtypeStruct((2, length, 4, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, length, 2, head_dim), dtype)
  seg = make_segments(0, length) if segments else None
  extra = case.inputs(jnp.zeros((2, length, 2, head_dim), dtype))
  return jax.eval_shape(lambda q, k, v: attention.get(case.kind)(
      q, k, v, causal=causal, segment_ids=seg, implementation=implementation,
      **case.settings, **extra), q, kv, kv)


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.parametrize('kind', sorted(KIND_CASES))
def test_auto_only_hands_a_kernel_calls_it_accepts(kind, backend, monkeypatch):
  chosen = []
  original = implementations.choose
  monkeypatch.setattr(implementations, 'choose',
                      lambda *a, **k: chosen.append(original(*a, **k)) or chosen[-1])
  for dtype, causal, segments in itertools.product((jnp.float32, jnp.bfloat16), (False, True),
                                                   (False, True)):
    chosen.clear()
    with implementations.for_backend(backend):
      try:
        out = _trace(KIND_CASES[kind], dtype, causal, segments)
        assert out.shape == (2, 64, 4, 64)
      except RuntimeError as e:  # jax accepted the call; there is no GPU here
        assert 'cuDNN is not detected' in str(e), e
        assert chosen[-1].name == 'cudnn'
    assert chosen and not chosen[-1].interpret
    name = chosen[-1].name
    assert name == 'xla' or name in attention.spec(kind).implementations
    if name == 'cudnn':  # what jax's cuDNN attention accepts
      assert dtype == jnp.bfloat16 and not segments
      assert kind == 'full' or causal
    if backend == 'tpu':
      assert name in ('xla', 'splash')
    if name == 'xla' and backend == 'gpu' and 'pallas_gpu' in attention.spec(kind).implementations:
      pytest.fail(f'{kind}: auto fell back to xla on a GPU although pallas_gpu computes it')


def test_bidirectional_local_never_goes_to_cudnn():
  """jax raises "cuDNN doesn't support right window" for (r, r): auto must not send it."""
  with implementations.for_backend('gpu'):
    out = _trace(KIND_CASES['local'], jnp.bfloat16, False, False)
    assert out.shape == (2, 64, 4, 64)
    with pytest.raises(ValueError, match='only a left window'):
      _trace(KIND_CASES['local'], jnp.bfloat16, False, False, implementation='cudnn')


def test_sequence_sharding_keeps_the_fused_kernels_out(monkeypatch):
  """cuDNN refuses sequence-sharded inputs, and a pallas_call would gather them."""
  monkeypatch.setattr(sharding, 'mesh_axis_size', lambda axis: 4 if axis == 'sequence' else 1)
  with implementations.for_backend('gpu'):
    assert implementations.choose('auto', 'local', supported=('xla', 'cudnn', 'pallas_gpu'),
                                  problems_found=implementations.problems(
                                      jnp.zeros((1, 8, 2, 64), jnp.bfloat16),
                                      segment_ids=None, bias_fn=None)).name == 'xla'
    with pytest.raises(ValueError, match='mesh.sequence = 4'):
      _trace(KIND_CASES['local'], jnp.bfloat16, True, False, implementation='pallas_gpu')


def test_head_dim_cap_and_bias():
  found = implementations.problems(jnp.zeros((1, 8, 2, 192), jnp.bfloat16), segment_ids=None,
                                   bias_fn=lambda rel: rel)
  assert 'position bias' in found['pallas_gpu'] and 'position bias' in found['splash']
  found = implementations.problems(jnp.zeros((1, 8, 2, 192), jnp.bfloat16), segment_ids=None,
                                   bias_fn=None)
  assert 'head_dim 192' in found['cudnn'] and 'pallas_gpu' not in found  # 128 off Hopper
  assert 'head_dim 320' in implementations.problems(
      jnp.zeros((1, 8, 2, 320), jnp.bfloat16), segment_ids=None, bias_fn=None)['pallas_gpu']


def test_explicit_choices_are_checked_before_anything_runs():
  case = KIND_CASES['local']
  with implementations.for_backend('gpu'):
    with pytest.raises(ValueError, match="'splash' runs on TPUs"):
      _trace(case, jnp.bfloat16, True, False, implementation='splash')
  with implementations.for_backend('tpu'):
    with pytest.raises(ValueError, match="'pallas_gpu' runs on GPUs"):
      _trace(case, jnp.bfloat16, True, False, implementation='pallas_gpu')
  with pytest.raises(ValueError, match='does not compute this kind'):
    _trace(KIND_CASES['hierarchical'], jnp.float32, True, False, implementation='pallas_gpu')
  # On a CPU the Pallas kernels run interpreted.
  choice = implementations.choose('splash', 'local', supported=('xla', 'splash'))
  assert choice.interpret == (jax.default_backend() == 'cpu')


def test_auto_logs_its_choice_once(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  monkeypatch.setattr(implementations, '_logged', set())
  with implementations.for_backend('gpu'):
    for _ in range(3):
      _trace(KIND_CASES['chunked'], jnp.float32, True, True)
  assert lines == ["attention chunked: implementation 'pallas_gpu'"]
