"""longjax.attention: long-context attention kernels as pure functions of arrays.

Every kernel takes q [batch, length, heads, head_dim] and k, v [batch,
length, kv_heads, head_dim] (grouped-query attention when kv_heads < heads),
`causal` and `segment_ids`, and returns an array shaped like q. No Flax, no
parameters: models choose a kernel by name through this registry.

    from longjax import attention
    out = attention.get('local')(q, k, v, radius=128, causal=True)

`KINDS` lists the names; `spec(kind)` says which keyword arguments a kind
takes, whether it runs causally, its cost and its paper.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from longjax.attention.adaptive_span import adaptive_span, needed_radius, soft_mask, span_penalty
from longjax.attention.chunked import chunked
from longjax.attention.dot_product import dot_product
from longjax.attention.global_local import global_local
from longjax.attention.hierarchical import hierarchical
from longjax.attention.local import local
from longjax.attention.transient_global import transient_global


@dataclasses.dataclass(frozen=True)
class KindSpec:
  name: str
  fn: Callable
  params: tuple[str, ...]  # keyword arguments beyond q, k, v, causal, segment_ids
  cost: str
  reference: str


_SPECS = (
    KindSpec('full', dot_product, (), 'O(L^2)', 'Vaswani et al. 2017'),
    KindSpec('local', local, ('radius',), 'O(L r)',
             'Longformer sliding window (Beltagy et al. 2020); LongT5 local'),
    KindSpec('global_local', global_local, ('radius', 'num_global'), 'O(L (r + g))',
             'Longformer / ETC global tokens; attention sinks (Xiao et al. 2023)'),
    KindSpec('transient_global', transient_global, ('radius', 'block_size'),
             'O(L (r + L/k))', 'LongT5 TGlobal (Guo et al. 2022)'),
    KindSpec('hierarchical', hierarchical, ('block_size',), 'O(L b log(L/b))',
             'H-Transformer-1D (Zhu & Soricut 2021)'),
    KindSpec('adaptive_span', adaptive_span, ('spans', 'max_span', 'ramp'), 'O(L S)',
             'Adaptive attention span (Sukhbaatar et al. 2019)'),
    KindSpec('chunked', chunked, ('block_size',), 'O(L b)',
             'split, attend, concatenate baseline'),
)
_REGISTRY = {s.name: s for s in _SPECS}
KINDS: tuple[str, ...] = tuple(_REGISTRY)


def spec(kind: str) -> KindSpec:
  """The registry entry of `kind`; unknown names list the valid ones."""
  try:
    return _REGISTRY[kind]
  except KeyError:
    raise ValueError(
        f'Unknown attention kind {kind!r}; valid kinds are: {", ".join(KINDS)}.') from None


def get(kind: str) -> Callable:
  """The kernel function registered as `kind`."""
  return spec(kind).fn


__all__ = [
    'KINDS', 'KindSpec', 'adaptive_span', 'chunked', 'dot_product', 'get',
    'global_local', 'hierarchical', 'local', 'needed_radius', 'soft_mask',
    'span_penalty', 'spec', 'transient_global',
]
