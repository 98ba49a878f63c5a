"""What the registry knows of an attention kind: one `KindSpec` per kind.

A kind is defined once, in its own module, by its `SPEC`:
  * `fn`, the training kernel (a pure function of q, k, v);
  * `params`, the settings it reads, named exactly as the config fields
    `model.attention.<param>` that hold them (so a model passes
    `{p: getattr(config, p) for p in spec.params}` and never a kind name);
  * `implementations`, which implementations compute it exactly ('xla'
    everywhere; 'cudnn', 'splash', 'pallas_gpu' where those kernels apply; see
    longjax.attention.implementations);
  * its decoding rule: `cache_layout(settings, max_length)`, how many cache
    slots of each sort a causal layer keeps, and `decode_keys(...)`, which of
    them a query at position t sees and with what bias or weight. Both are
    written beside the kernel from the same visibility functions the kernel
    builds its tile masks with, so the cache cannot drift from the kernel;
  * what the model layer must supply besides the settings: `learns_spans`
    (a learned span per head, adaptive span), `accepts_global_mask` (the
    task's marked global tokens), `summary_layout` (block summaries built
    from the layer's inputs, LongT5's TGlobal) and `global_projections`
    (separate projections for global rows, Longformer's);
  * its cost and its paper, and its attention budget: `keys_per_query`, how
    many keys (a pooled key or summary counting as one) the representative
    query attends, and `budget_param`, the setting that scales it, which
    `experiments.sweep --match=keys` sets to match kinds.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Mapping, NamedTuple, Optional

import jax


class CacheLayout(NamedTuple):
  """Static shape of one layer's decoding cache (hashable; not traced).

  The window buffer has `pinned` slots for positions 0..pinned-1 and a ring of
  `ring` slots for the positions after them; pooled buffer i holds means of
  `pool_sizes[i]` consecutive tokens in a ring of `pool_slots[i]` slots.
  """
  pinned: int
  ring: int
  pool_sizes: tuple[int, ...] = ()
  pool_slots: tuple[int, ...] = ()
  # The pooled keys/values are formed by the layer from the group's summed
  # inputs (LongT5 summaries), not as the mean of the group's keys/values.
  pool_from_inputs: bool = False
  # The pinned positions also keep keys/values of the global projections
  # (set by a layer that has them, see KindSpec.global_projections).
  global_slots: int = 0
  # Every pooled buffer also keeps the query of its open group's first
  # position (H-Transformer-1D's causal coarse query).
  pool_queries: bool = False

  @property
  def slots(self) -> int:
    return self.pinned + self.ring


class Slots(NamedTuple):
  """What a decode rule reads of a buffer: keys, values and what each slot holds.

  k, v: [batch, kv_heads, slots, head_dim]; held: [batch, slots] int32, the
  position (window buffer) or group index (pooled buffer) of each slot, -1
  for an empty slot. query: [batch, heads, head_dim], the query of the open
  group's first position (pooled buffers of layouts with pool_queries), or None.
  """
  k: jax.Array
  v: jax.Array
  held: jax.Array
  query: Optional[jax.Array] = None


class KeyGroup(NamedTuple):
  """Keys one query may attend, with what the kernel adds to their scores.

  k, v: [batch, kv_heads, slots, head_dim].
  mask: bool [batch, slots], or [batch, heads, slots] when it differs by head.
  rel: int [batch, slots], query position - key position, for a position
    bias (None: no bias for this group).
  log_weight: float [batch, slots] added to the score (log of how many tokens
    a pooled key stands for), or None.
  weight: float [batch, heads, slots] multiplying the unnormalised probability
    (adaptive span's soft mask), or None; keys of weight 0 must be masked.
  bias: float [batch, heads, slots] added to the score, a bias the rule
    computes itself (transient-global summaries' own table), or None.
  query: [batch, heads, head_dim], the query this group is scored with
    instead of the token's own (H-Transformer-1D's coarse query), or None.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  rel: Optional[jax.Array] = None
  log_weight: Optional[jax.Array] = None
  weight: Optional[jax.Array] = None
  bias: Optional[jax.Array] = None
  query: Optional[jax.Array] = None


def budget_query(length: int, causal: bool) -> int:
  """The query whose keys `KindSpec.keys_per_query` counts: the last when causal
  (it sees the most), the middle one bidirectionally (away from both ends)."""
  return length - 1 if causal else length // 2


# keys_per_query(settings, length, causal) -> int
KeysFn = Callable[[Mapping, int, bool], int]
# cache_layout(settings, max_length) -> CacheLayout
LayoutFn = Callable[[Mapping, int], CacheLayout]
# decode_keys(settings, window: Slots, pooled: tuple[Slots, ...], t [batch], **extra)
#   -> list[KeyGroup]; `extra` is what the model supplies (spans).
DecodeKeysFn = Callable[..., list]


@dataclasses.dataclass(frozen=True)
class Param:
  """A kernel setting and its valid values (checked once, when a config is validated)."""
  name: str
  minimum: float = 1
  integer: bool = True
  exclusive: bool = False  # value must be > minimum (not >=)
  even: bool = False

  def problem(self, value) -> Optional[str]:
    """None if `value` is valid, else what is wrong, as a sentence."""
    kind = 'an int' if self.integer else 'a number'
    if self.integer and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
      return f'must be {kind}; got {value!r}.'
    if not isinstance(value, numbers.Real):
      return f'must be {kind}; got {value!r}.'
    if (value <= self.minimum) if self.exclusive else (value < self.minimum):
      return f'must be {">" if self.exclusive else ">="} {self.minimum}; got {value!r}.'
    if self.even and value % 2:
      return f'must be even (each level halves it); got {value!r}.'
    return None


PARAMS = {p.name: p for p in (
    Param('radius'),
    Param('num_global', minimum=0),
    Param('summary_block'),
    Param('level0_block', minimum=2, even=True),
    Param('chunk_size'),
    Param('max_span'),
    Param('span_ramp', minimum=0, integer=False, exclusive=True),
)}


@dataclasses.dataclass(frozen=True)
class KindSpec:
  name: str
  fn: Callable
  params: tuple[str, ...]  # settings beyond q, k, v, causal, segment_ids (keys of PARAMS)
  cost: str
  reference: str
  cache_layout: LayoutFn
  decode_keys: DecodeKeysFn
  implementations: tuple[str, ...] = ('xla',)
  learns_spans: bool = False
  accepts_global_mask: bool = False
  # Summaries built by the layer from its inputs (transient_global): the
  # kind's summary_layout(segment_ids, batch=, length=, summary_block=,
  # causal=) says which token goes into which summary slot; the kernel then
  # takes summary_k, summary_v and summary_bias_fn.
  summary_layout: Optional[Callable] = None
  # Global rows computed from separate projections (Longformer's Q_g, K_g,
  # V_g): the kernel takes global_qkv, and decode_global_keys(settings,
  # pinned: Slots of the pinned positions' global keys/values, t) -> (groups,
  # is_global [b]) is the decode rule of a query that is a global token.
  global_projections: bool = False
  decode_global_keys: Optional[Callable] = None
  # Whether the kind aligns its structure (global tokens, blocks, groups,
  # chunks) to every segment, so that a packed document gets what it gets
  # alone. False: aligned to the row, exact only for a row's first segment, so
  # runs refuse packed LM data (config.dataset.pack).
  segment_aligned: bool = True
  # The kernel's tile along the sequence, tile(settings) -> int (None: no
  # tiling). A sequence-sharded input must give each shard whole tiles, so that
  # a tile's neighbours are whole blocks of the next shard (config validation).
  tile: Optional[Callable[[Mapping], int]] = None
  # The attention budget: keys_per_query(settings, length, causal), the keys
  # the `budget_query` of one unpacked row of `length` attends (a pooled key,
  # coarse key or summary counts as one; global tokens' own rows excluded),
  # and budget_param, the setting it grows with (None: nothing to set, full).
  keys_per_query: Optional[KeysFn] = None
  budget_param: Optional[str] = None
  # Every key a query sees lies within a fixed distance of it (a sliding window,
  # chunks, spans): a "local layer" for settings that differ by layer type (RoPE's
  # base and scaling, as Gemma 3's local and global layers).
  windowed: bool = False

  def settings(self, values) -> dict:
    """This kind's settings from any object (a typed config) or mapping holding them."""
    get = values.get if isinstance(values, Mapping) else lambda p: getattr(values, p)
    return {p: get(p) for p in self.params}

  def problems(self, settings: Mapping) -> dict[str, str]:
    """{param: what is wrong} for every invalid setting of this kind."""
    found = {}
    for param in self.params:
      problem = PARAMS[param].problem(settings[param])
      if problem:
        found[param] = problem
    return found
