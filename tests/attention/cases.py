"""The kernel cases every attention test runs: one table, each kernel call beside
its dense reference (tests/attention/reference.py, which shares no code with
longjax.attention), and the inputs they run on."""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from longjax import attention
from tests.attention import reference as ref

HEADS, KV_HEADS, DIM = 4, 2, 8
SPANS = jnp.array([0.0, 3.5, 9.0, 40.0])  # adaptive span per head: empty to beyond max_span


def make_inputs(seed, length, batch=2, dtype=jnp.float32, kv_heads=KV_HEADS):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, length, HEADS, DIM))
  k = rng.normal(size=(batch, length, kv_heads, DIM))
  v = rng.normal(size=(batch, length, kv_heads, DIM))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def make_segments(seed, length, batch=2):
  """Contiguous segments of random lengths (1..length/2), padding (0) at the end."""
  rng = np.random.default_rng(seed + 100)
  out = np.zeros((batch, length), np.int32)
  for b in range(batch):
    pos, seg = 0, 1
    end = length - rng.integers(0, length // 5 + 1)
    while pos < end:
      n = int(rng.integers(1, max(2, length // 2)))
      out[b, pos:min(end, pos + n)] = seg
      pos += n
      seg += 1
  return jnp.asarray(out)


def marked_globals(length):
  """A task's marked global tokens: scattered in row 0, the two ends in row 1."""
  mask = np.zeros((2, length), bool)
  mask[0, [p for p in (3, 30, 31, 50) if p < length]] = True
  mask[1, [0, length - 1]] = True
  return mask


def summaries(k, block):
  """Summary keys and values for the kernel's length // block slots (a model
  forms them from its inputs; the kernel takes any)."""
  b, length, kv_heads, d = k.shape
  rng = np.random.default_rng(length)
  shape = (b, length // block, kv_heads, d)
  return dict(summary_k=jnp.asarray(rng.normal(size=shape), k.dtype),
              summary_v=jnp.asarray(rng.normal(size=shape), k.dtype))


@dataclasses.dataclass(frozen=True)
class Case:
  """A kernel call: kind and settings, and its dense reference.

  reference(q, k, v, causal, segment_ids) -> the dense masked attention the
  kernel's definition gives; `inputs(k)` adds keyword arguments for keys k
  of that shape (a global mask, summaries).
  """
  kind: str
  settings: dict
  reference: Callable
  inputs: Callable = lambda k: {}

  def kernel(self, q, k, v, causal, segment_ids):
    return attention.get(self.kind)(q, k, v, causal=causal, segment_ids=segment_ids,
                                    **self.settings, **self.inputs(k))


def _local(radius):
  return lambda q, k, v, causal, seg: ref.dense(q, k, v, ref.mask_local(
      q.shape[0], q.shape[1], radius=radius, causal=causal, segment_ids=seg))


def _global_local(radius, num_global, marked=None):
  def reference(q, k, v, causal, seg, global_qkv=None):
    b, length = q.shape[:2]
    is_global = ref.global_tokens(b, length, num_global=num_global, segment_ids=seg,
                                  marked=None if marked is None else marked(length))
    mask = ref.mask_global_local(b, length, radius=radius, is_global=is_global, causal=causal,
                                 segment_ids=seg)
    out = ref.dense(q, k, v, mask)
    if global_qkv is None:
      return out
    # Longformer: global rows from their own projections, over every key they see.
    rows = ref.dense(*global_qkv, mask)
    return jnp.where(jnp.asarray(is_global)[:, :, None, None], rows, out)
  return reference


def adaptive_reference(q, k, v, causal, seg, max_span, ramp, spans=SPANS):
  mask = ref.mask_local(q.shape[0], q.shape[1], radius=max_span, causal=causal, segment_ids=seg)
  return ref.dense(q, k, v, mask, weight=ref.adaptive_weight(q.shape[1], spans, ramp))


CASES = {
    'full': Case('full', {}, lambda q, k, v, causal, seg: ref.dense(q, k, v, ref.mask_full(
        q.shape[0], q.shape[1], q.shape[1], causal=causal, segment_ids=seg))),
    'local_r3': Case('local', dict(radius=3), _local(3)),
    'local_r20': Case('local', dict(radius=20), _local(20)),
    'global_local': Case('global_local', dict(radius=4, num_global=3), _global_local(4, 3)),
    'global_local_mask': Case(
        'global_local', dict(radius=4, num_global=3), _global_local(4, 3, marked_globals),
        inputs=lambda k: dict(global_mask=jnp.asarray(marked_globals(k.shape[1])))),
    'transient_global': Case(
        'transient_global', dict(radius=3, summary_block=5),
        lambda q, k, v, causal, seg: ref.transient_global(
            q, k, v, **summaries(k, 5), radius=3, block_size=5, causal=causal,
            segment_ids=seg),
        inputs=lambda k: summaries(k, 5)),
    'hierarchical': Case(
        'hierarchical', dict(level0_block=4),
        lambda q, k, v, causal, seg: ref.h_transformer_1d(
            q, k, v, block_size=4, causal=causal, segment_ids=seg)),
    'multiresolution': Case(
        'multiresolution', dict(level0_block=4),
        lambda q, k, v, causal, seg: ref.multiresolution(
            q, k, v, block_size=4, causal=causal, segment_ids=seg)),
    'adaptive_span': Case(
        'adaptive_span', dict(spans=SPANS, max_span=12, span_ramp=4.0),
        lambda q, k, v, causal, seg: adaptive_reference(q, k, v, causal, seg, 12, 4.0)),
    'chunked': Case('chunked', dict(chunk_size=6),
                    lambda q, k, v, causal, seg: ref.dense(q, k, v, ref.mask_chunked(
                        q.shape[0], q.shape[1], block_size=6, causal=causal,
                        segment_ids=seg))),
}


def intermediate_sizes(loss, *args) -> list[int]:
  """Elements of every array in the jaxpr of grad(loss)(*args), nested jaxprs included."""
  sizes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      sizes.extend(int(np.prod(getattr(var.aval, 'shape', ()))) for var in eqn.outvars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if hasattr(sub, 'eqns'):
            visit(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            visit(sub.jaxpr)

  visit(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args).jaxpr)
  return sizes
