"""longjax.attention: long-context attention kernels as pure functions of arrays.

Every kernel takes q [batch, length, heads, head_dim] and k, v [batch,
length, kv_heads, head_dim] (grouped-query attention when kv_heads < heads),
`causal` and `segment_ids`, and returns an array shaped like q. No Flax, no
parameters: models choose a kernel by name through this registry.

    from longjax import attention
    out = attention.get('local')(q, k, v, radius=128, causal=True)

`KINDS` lists the names; `spec(kind)` is the kind's one definition (see
`spec.KindSpec`): its settings, implementations, decoding rule, cost and paper.
`implementations` chooses between the XLA kernels, cuDNN, splash (TPU) and
longjax's Pallas GPU kernel; on a CPU the Pallas kernels run interpreted:

    attention.get('local')(q, k, v, radius=128, causal=False, implementation='splash')
Each kind's module defines its `SPEC`; adding a kind is a module and one line
here. `cached.attend` is the decode-time (single-query) attention.
"""
from __future__ import annotations

from typing import Callable

from longjax.attention import adaptive_span as _adaptive_span
from longjax.attention import chunked as _chunked
from longjax.attention import dot_product as _dot_product
from longjax.attention import global_local as _global_local
from longjax.attention import hierarchical as _hierarchical
from longjax.attention import implementations
from longjax.attention import local as _local
from longjax.attention import multiresolution as _multiresolution
from longjax.attention import transient_global as _transient_global
from longjax.attention._core import scatter_rows
from longjax.attention.adaptive_span import adaptive_span, needed_radius, soft_mask, span_penalty
from longjax.attention.chunked import chunked
from longjax.attention.dot_product import dot_product
from longjax.attention.global_local import global_local
from longjax.attention.hierarchical import hierarchical
from longjax.attention.local import local
from longjax.attention.multiresolution import multiresolution
from longjax.attention.spec import PARAMS, CacheLayout, KeyGroup, KindSpec, Slots, budget_query
from longjax.attention.transient_global import transient_global

_SPECS = (_dot_product.SPEC, _local.SPEC, _global_local.SPEC, _transient_global.SPEC,
          _hierarchical.SPEC, _multiresolution.SPEC, _adaptive_span.SPEC, _chunked.SPEC)
_REGISTRY = {s.name: s for s in _SPECS}
KINDS: tuple[str, ...] = tuple(_REGISTRY)
# The default kind: full attention, the reference every other kind is measured against.
DEFAULT_KIND = _dot_product.SPEC.name


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
    'CacheLayout', 'DEFAULT_KIND', 'KINDS', 'KeyGroup', 'KindSpec', 'PARAMS', 'Slots',
    'adaptive_span', 'budget_query',
    'chunked', 'dot_product', 'get', 'global_local', 'hierarchical', 'implementations', 'local',
    'multiresolution',
    'needed_radius', 'scatter_rows', 'soft_mask', 'span_penalty', 'spec', 'transient_global',
]
