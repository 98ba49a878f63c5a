"""Global + local attention: Longformer's global attention (Beltagy et al. 2020, §3.1).

Every query attends its sliding window (|i - j| <= radius) and the global
tokens of its segment; a global token attends every key of its segment. When
causal, every query sees only keys j <= i, global or not. Cost:
O(length * (radius + num_global)).

Global tokens, aligned to the document: the first `num_global` tokens of every
segment (`global_mask=None`; with segment_ids, each packed document has its
own), or a task's marked tokens (`global_mask`), at most `num_global` per
segment (later marks are local). A packed document gets exactly what it gets
alone.

Separate projections (Longformer §3.1, "Linear Projections for Global
Attention"): the rows of global queries are computed from their own
projections, softmax(Q_g K_g^T) V_g over the keys they see, when `global_qkv =
(q_g, k_g, v_g)` is given (the model's default); every other row uses q, k, v
(its global keys too, as in Longformer, where K_s, V_s serve local queries).

In a causal LM, prefix global tokens can only summarise the first
`num_global` tokens of their document: causal `global_local` is local
attention plus attention sinks (StreamingLLM, Xiao et al. 2023), not a
long-range path. The passkey task's 'marked' mode makes its question tokens
global, so there the scored rows attend the whole prefix.

How: the window tiles of `local` (tile T >= radius), and per tile a small set
of slots — the tile's own positions and the global tokens, outside the tile, of
the segments of its first and last tokens (at most 2 * num_global; for one
unpacked row with prefix globals, just its num_global); every global token a
tile's queries or keys can pair with is among them. So:
  1. the blocked window with global keys removed from it (none counted twice);
  2. each query tile against its slots' global keys ([T, T + 2g] scores);
  3. the slots' global queries against each key tile ([T + 2g, T] scores);
     their partial softmax statistics merge across tiles by log-sum-exp into
     the global rows, which replace what 1. + 2. gave them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from longjax import sharding
from longjax.attention import _blocks, _core, band, implementations, pallas_gpu, spec
from longjax.attention.local import (default_block, ring_length, window_group, window_keys,
                                     window_part, window_visible)


def prefix_global(position, num_global: int):
  """Whether a position (in its segment) is a prefix global token (numpy or jax ints)."""
  return position < num_global


class Globals(NamedTuple):
  """The global tokens of a batch.

  is_global: [b, l] bool; table: [b, l, num_global] int32, at a segment's first
  position the positions of its global tokens in order (-1 none), elsewhere -1;
  start: [b, l] int32 the first position of each token's segment.
  """
  is_global: jax.Array
  table: jax.Array
  start: jax.Array


def global_tokens(segment_ids, global_mask, *, num_global: int, batch: int, length: int):
  """Which tokens are global: (is_global, rank, start), [b, l] each.

  rank: a token's rank among its segment's candidates (its position in the
  segment, or the marks before it in the segment); start: its segment's first
  position. Built from running scans only (`_core.cumulative`), so a
  sequence-sharded input is never gathered.
  """
  seg = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
  start, _ = _core.segment_bounds(seg)
  positions = jnp.arange(length, dtype=jnp.int32)[None, :]
  if global_mask is None:
    rank = positions - start
    candidate = jnp.ones((batch, length), bool)
  else:
    candidate = global_mask.astype(bool)
    count = _core.cumulative(candidate, 'add')
    # The marks before the segment: (count - candidate) at its first token,
    # carried forward by a running max (it never decreases along the row).
    before = _core.cumulative(jnp.where(positions == start, count - candidate, 0), 'max')
    rank = count - before - 1
  return candidate & prefix_global(rank, num_global), rank, start


def global_table(is_global, rank, start, num_global: int):
  """[b, l, num_global]: at each segment's first position (start, [b, l]) the
  positions of its global tokens in rank order, -1 elsewhere and for none."""
  batch, length = is_global.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  rows = jnp.arange(batch)[:, None]
  return jnp.full((batch, length, num_global), -1, jnp.int32).at[
      rows, start, jnp.where(is_global, rank, num_global)].set(positions, mode='drop')


def find_globals(segment_ids, global_mask, *, num_global: int, batch: int,
                 length: int) -> Globals:
  """Each segment's global tokens: its first num_global, or its first num_global marked."""
  is_global, rank, start = global_tokens(segment_ids, global_mask, num_global=num_global,
                                         batch=batch, length=length)
  return Globals(is_global, global_table(is_global, rank, start, num_global), start)


def _slots(globals_: Globals, *, tile: int, n: int, one_prefix: bool, own: bool = True):
  """Per tile, the positions [b, n, T + 2g] that may hold a global token its
  queries or keys pair with, and whether each slot is one ([b, n, T + 2g]).

  one_prefix: the row is one segment with prefix globals, so the slots are
  just its g global tokens, the same for every tile.
  own: include the tile's own positions (False: [b, n, 2g], for a caller whose
  kernel already covers each tile's own keys).
  """
  b, length, g = globals_.table.shape
  if one_prefix:
    pos = jnp.broadcast_to(globals_.table[:, :1, :], (b, n, g))
    return jnp.maximum(pos, 0), pos >= 0
  padded = n * tile
  first = jnp.arange(n) * tile
  last = jnp.minimum(first + tile - 1, length - 1)
  lo, hi = first[None, :, None], (first + tile)[None, :, None]
  table_of = lambda p: jnp.take_along_axis(
      globals_.table, jnp.take_along_axis(globals_.start, jnp.broadcast_to(p, (b, n)), 1)[
          :, :, None], axis=1)  # [b, n, g]
  before = table_of(first[None, :])
  before = jnp.where(before < lo, before, -1)  # the first token's segment, outside the tile
  after = table_of(last[None, :])
  after = jnp.where(after >= hi, after, -1)  # the last token's segment, outside the tile
  if not own:
    pos = jnp.concatenate([before, after], axis=2)
    return jnp.maximum(pos, 0), pos >= 0
  own = jnp.broadcast_to(jnp.arange(padded).reshape(n, tile), (b, n, tile))
  is_global = _core.pad_axis(globals_.is_global, 1, padded).reshape(b, n, tile)
  pos = jnp.concatenate([before, after, jnp.where(is_global, own, -1)], axis=2)
  return jnp.maximum(pos, 0), pos >= 0


def _gather(x, pos, axis):
  """x [b, hk, (g,) l, d] at positions pos [b, n, s] -> [b, hk, (g,) n, s, d]."""
  b, n, s = pos.shape
  index = pos.reshape((b,) + (1,) * (axis - 1) + (n * s, 1))
  taken = jnp.take_along_axis(x, index, axis=axis)
  return taken.reshape(taken.shape[:axis] + (n, s, x.shape[-1]))


def _bias(bias_fn, rel, kv_heads):
  """bias_fn on rel [b, n, a, c] -> [b, hk, n, group, a, c]."""
  return jnp.moveaxis(_core.bias_heads(bias_fn, rel, kv_heads), (4, 5), (1, 3))


def global_local(q, k, v, *, radius: int, num_global: int, causal: bool = False,
                 segment_ids=None, global_mask=None, global_qkv=None,
                 bias_fn: Optional[_core.BiasFn] = None,
                 scale: Optional[float] = None, tile: Optional[int] = None,
                 implementation: str = 'auto'):
  """Sliding window of `radius` plus global tokens (see the module doc).

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    radius: local window radius (>= 1).
    num_global: global tokens per segment: its first num_global, or with
      `global_mask` the most it may have (later marks are local).
    causal: only keys j <= i, global or not.
    segment_ids: [batch, length] ints.
    global_mask: optional [batch, length] bool marking global tokens.
    global_qkv: optional (q_g, k_g, v_g), shaped as q, k, v: the separate
      projections the global rows are computed from (Longformer); None: q, k, v.
    bias_fn, scale, tile, implementation: as in `local`.
  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  name = 'global_local'
  qh, kh, vh, seg, dims = _core.self_attention_inputs(q, k, v, segment_ids, scale, name)
  batch, length = dims.batch, dims.length
  radius = _core.check_positive_int(radius, name, 'radius')
  num_global = _core.check_positive_int(num_global, name, 'num_global', minimum=0)
  if global_mask is not None and global_mask.shape != (batch, length):
    raise ValueError(f'{name}: global_mask must be [batch, length] = {(batch, length)}; '
                     f'got {global_mask.shape}.')
  one_prefix = seg is None and global_mask is None
  choice = implementations.choose(
      implementation, name, supported=SPEC.implementations,
      problems_found=implementations.problems(
          q, segment_ids=seg, bias_fn=bias_fn, window=radius if num_global == 0 else None,
          extra={'splash': '' if one_prefix or num_global == 0 else
                           "splash's masks are static, and the global tokens of packed "
                           'segments or marked tokens are not'}))
  tile = tile or default_block(radius)
  right = 0 if causal else radius
  if num_global == 0:
    if choice.name != 'xla':
      return band.output(choice, qh, kh, vh, left=radius, right=right, causal=causal,
                         segment_ids=seg, dtype=q.dtype)
    return _core.merge([window_part(qh, kh, vh, block=tile, before=1, after=0 if causal else 1,
                                    radius=radius, causal=causal, segment_ids=seg,
                                    bias_fn=bias_fn)], q.dtype)
  if global_qkv is None:
    gq, gk, gv = qh, kh, vh
  else:
    if tuple(x.shape for x in global_qkv) != (q.shape, k.shape, v.shape):
      raise ValueError(f'{name}: global_qkv must be shaped as q, k, v; got '
                       f'{[x.shape for x in global_qkv]}.')
    gq, gk, gv, _, _ = _core.self_attention_inputs(*global_qkv, None, scale, name)

  shards = sharding.mesh_axis_size('sequence')
  if choice.name == 'xla' and shards > 1 and length % shards == 0:
    return _sequence_sharded(qh, kh, vh, gq, gk, gv, seg, global_mask, radius=radius,
                             num_global=num_global, tile=tile, causal=causal, bias_fn=bias_fn,
                             dtype=q.dtype)
  found = find_globals(seg, global_mask, num_global=num_global, batch=batch, length=length)
  tiles = _tiles(found, seg, tile=tile, one_prefix=one_prefix)
  if choice.name == 'splash':
    # The window and the row's first num_global keys in one static mask.
    out = band.output(choice, qh, kh, vh, left=radius, right=right, causal=causal,
                      segment_ids=None, global_columns=num_global, dtype=q.dtype)
  elif choice.name == 'pallas_gpu':
    # The kernel takes the window and every global key in the key blocks it
    # visits; the global keys beyond them come as a part of their own.
    block, lo, hi = pallas_gpu.visited_key_blocks(length, length, dims.head_dim,
                                                  pallas_gpu.Band(radius, right, causal))
    window = band.part(choice, qh, kh, vh, left=radius, right=right, causal=causal,
                       segment_ids=seg, key_global=found.is_global)
    # Each tile's own global keys lie in the blocks the kernel visits.
    far_tiles = _tiles(found, seg, tile=block, one_prefix=one_prefix, own=False)
    far = _global_keys_part(qh, kh, vh, far_tiles, causal=causal, bias_fn=None,
                            visited=(lo * block, hi * block))
    out = _core.merge([window, far], q.dtype)
  else:
    # 1. The window, without the global keys (they come in 2.).
    window = window_part(qh, kh, vh, block=tile, before=1, after=0 if causal else 1,
                         radius=radius, causal=causal, segment_ids=seg, bias_fn=bias_fn,
                         key_exclude=found.is_global)
    # 2. Each query tile against its slots' global keys.
    out = _core.merge([window, _global_keys_part(qh, kh, vh, tiles, causal=causal,
                                                 bias_fn=bias_fn)], q.dtype)
  # 3. The global queries' rows.
  rows = _core.merge([_global_rows(gq, gk, gv, tiles, length=length, causal=causal,
                                    bias_fn=bias_fn)], q.dtype)
  return jnp.where(found.is_global[:, :, None, None], rows, out)


def _sequence_sharded(qh, kh, vh, gq, gk, gv, seg, global_mask, *, radius: int,
                      num_global: int, tile: int, causal: bool, bias_fn, dtype):
  """global_local with the length sharded over `sequence`: the window by GSPMD
  (its halo), the global parts by exchanging global tokens only
  (`global_exchange`)."""
  from longjax.attention import global_exchange  # it builds on this module
  batch, length = qh.shape[0], qh.shape[3]
  seg = jnp.zeros((batch, length), jnp.int32) if seg is None else seg
  is_global, rank, start = global_tokens(seg, global_mask, num_global=num_global, batch=batch,
                                         length=length)
  window = window_part(qh, kh, vh, block=tile, before=1, after=0 if causal else 1,
                       radius=radius, causal=causal, segment_ids=seg, bias_fn=bias_fn,
                       key_exclude=is_global)
  keys, rows = global_exchange.global_parts(qh, kh, vh, gq, gk, gv, seg, is_global, rank, start,
                                            num_global=num_global, tile=tile, causal=causal,
                                            bias_fn=bias_fn)
  out = _core.merge([window, keys], dtype)
  return jnp.where(is_global[:, :, None, None], _core.merge([rows], dtype), out)


def _tiles(found: Globals, seg, *, tile: int, one_prefix: bool, own: bool = True):
  """Per tile of `tile` positions: its global slots (pos, valid [b, n, s]), their
  segments, the tile's positions [1, n, T] and segments [b, n, T]."""
  batch, length = found.is_global.shape
  n = -(-length // tile)
  padded = n * tile
  pos, valid = _slots(found, tile=tile, n=n, one_prefix=one_prefix, own=own)
  seg_all = jnp.zeros((batch, length), jnp.int32) if seg is None else seg
  seg_slot = jnp.take_along_axis(seg_all, pos.reshape(batch, -1), 1).reshape(pos.shape)
  tile_pos = jnp.arange(padded).reshape(n, tile)[None]
  seg_tile = _core.pad_axis(seg_all, 1, padded, value=-1).reshape(batch, n, tile)
  return pos, valid, seg_slot, tile_pos, seg_tile


def _global_keys_part(qh, kh, vh, tiles, *, causal: bool, bias_fn,
                      visited=None) -> _core.Part:
  """Each query tile against its slots' global keys: [T, s] score tiles.

  tiles: `_tiles(...)` of the tile length the queries are cut into.
  visited: (first [n], end [n]) key positions a kernel already covered for
  each tile; the global keys among them are left out here.
  """
  batch, kv_heads, _, length, dim = qh.shape
  pos, valid, seg_slot, tile_pos, seg_tile = tiles
  n, tile = tile_pos.shape[1:]
  mask = valid[:, :, None, :] & (seg_tile[:, :, :, None] == seg_slot[:, :, None, :])
  rel = tile_pos[:, :, :, None] - pos[:, :, None, :]  # query - key
  if causal:
    mask = mask & (rel >= 0)
  if visited is not None:
    first, end = visited
    outside = (pos < first[None, :, None]) | (pos >= end[None, :, None])
    mask = mask & outside[:, :, None, :]
  qb = jnp.swapaxes(_core.pad_axis(qh, 3, n * tile).reshape(
      batch, kv_heads, -1, n, tile, dim), 2, 3)  # [b, hk, n, g, T, d]
  part = _blocks.attend_blocks(
      qb, _gather(kh, pos, 2), _gather(vh, pos, 2), mask=mask[:, None, :, None],
      bias=None if bias_fn is None else _bias(bias_fn, rel, kv_heads))
  return _core.slice_part(part, length)


def _global_rows(gq, gk, gv, tiles, *, length: int, causal: bool, bias_fn) -> _core.Part:
  """The global queries' rows as a Part over [b, hk, g, l] (sum 0 elsewhere):
  the slots' global queries against each key tile ([s, T] tiles), merged
  across tiles per global query by log-sum-exp."""
  batch, kv_heads = gq.shape[:2]
  pos, valid, seg_slot, tile_pos, seg_tile = tiles
  n, tile = tile_pos.shape[1:]
  mask = valid[:, :, :, None] & (seg_slot[:, :, :, None] == seg_tile[:, :, None, :])
  rel = pos[:, :, :, None] - tile_pos[:, :, None, :]
  if causal:
    mask = mask & (rel >= 0)
  blocks = lambda x: _core.pad_axis(x, 2, n * tile).reshape(batch, kv_heads, n, tile, -1)
  queries = jnp.swapaxes(_gather(gq, pos, 3), 2, 3)  # [b, hk, n, g, s, d]
  part = _blocks.attend_blocks(queries, blocks(gk), blocks(gv), mask=mask[:, None, :, None],
                             bias=None if bias_fn is None else _bias(bias_fn, rel, kv_heads))
  return _merge_by_position(part, pos, valid, length)


def _merge_by_position(part: _core.Part, pos, valid, length) -> _core.Part:
  """The parts of each position (slots of every tile) as one Part per position.

  part: rows [b, hk, g, n * s]; pos, valid [b, n, s]. Returns a Part over
  [b, hk, g, length] (sum 0 for positions without a part).
  """
  b, hk, g, _ = part.max.shape
  ids = (jnp.where(valid, pos, length) + jnp.arange(b)[:, None, None] * (length + 1))
  ids = ids.reshape(-1)
  flat = lambda x: jnp.moveaxis(x, 3, 1).reshape((-1,) + x.shape[1:3] + x.shape[4:])
  segments = b * (length + 1)
  best = jax.ops.segment_max(flat(part.max), ids, num_segments=segments)
  best = jax.lax.stop_gradient(best)
  correction = jnp.exp(flat(part.max) - best[ids])
  total = jax.ops.segment_sum(flat(part.sum) * correction, ids, num_segments=segments)
  out = jax.ops.segment_sum(flat(part.out) * correction[..., None], ids, num_segments=segments)
  rows = lambda x: jnp.moveaxis(x.reshape((b, length + 1) + x.shape[1:])[:, :length], 1, 3)
  return _core.Part(jnp.maximum(rows(best), _core.MASK_VALUE), rows(total), rows(out))


# Decoding (prefix global tokens only): the first num_global positions stay
# pinned in the cache (attention sinks), the window is a ring. With separate
# projections the pinned positions also keep their global keys/values, for the
# rows of a prompt shorter than num_global (`decode_global_keys`).
def keys_per_query(settings, length: int, causal: bool) -> int:
  """The budget query's window and the row's prefix globals (those before it
  when causal), each key once: 2r + 1 + g in a long row, r + 1 + g causally."""
  visible = window_keys(length, settings['radius'], causal)
  query = spec.budget_query(length, causal)
  visible[:min(settings['num_global'], query + 1 if causal else length)] = True
  return int(visible.sum())


def cache_layout(settings, max_length: int) -> spec.CacheLayout:
  return spec.CacheLayout(pinned=min(settings['num_global'], max_length),
                          ring=ring_length(settings['radius'] + 1, max_length))


def decode_keys(settings, window: spec.Slots, pooled, t) -> list:
  del pooled
  radius, num_global = settings['radius'], settings['num_global']
  return [window_group(window, t, lambda query, key: (key <= query) & (
      prefix_global(key, num_global) | window_visible(query - key, radius=radius, causal=True)))]


def decode_global_keys(settings, pinned: spec.Slots, t):
  """For a query at t [b] that is a global token (`prefix_global(t)`, the
  first positions): the pinned global keys/values it sees (keys <= t); with
  whether each row's query is global, [b] bool."""
  num_global = settings['num_global']
  mask = (pinned.held >= 0) & (pinned.held <= t[:, None])
  return [spec.KeyGroup(pinned.k, pinned.v, mask, rel=t[:, None] - pinned.held)], \
      prefix_global(t, num_global)


SPEC = spec.KindSpec(
    'global_local', global_local, ('radius', 'num_global'), 'O(L (r + g))',
    'Longformer global attention (Beltagy et al. 2020); attention sinks (Xiao et al. 2023)',
    cache_layout=cache_layout, decode_keys=decode_keys, accepts_global_mask=True,
    global_projections=True, decode_global_keys=decode_global_keys,
    implementations=('xla', 'splash', 'pallas_gpu'),
    tile=lambda settings: default_block(settings['radius']),
    keys_per_query=keys_per_query, budget_param='radius')
