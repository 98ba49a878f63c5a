"""global_local on a sequence-sharded input: the global parts by explicit exchange.

Under GSPMD, the global parts of `global_local` (each tile's global keys, the
global queries' rows) gather K, V and the rows of the whole sequence: 196 MiB
per layer at 64k tokens on 8 shards. Here the window stays with GSPMD (its
neighbour blocks move exactly the halo) and the global parts run per shard
(shard_map over 'sequence'), exchanging only global tokens:

  * A segment that lies inside one shard has its global tokens there. The
    only segments a shard shares with others are its first and its last (the
    ones crossing its edges), so each shard sends the global tokens it holds
    of those two — at most 2 num_global rows of k, v and the global query —
    to every shard (an all-gather of n x 2g rows). A shard keeps those of its
    own first and last segments held elsewhere: at most 2g, its *external*
    globals.
  * Each query tile attends its local global slots (`global_local._tiles`)
    and the external globals, in one part.
  * A global query's row spans its whole segment, so every shard its segment
    touches computes a partial softmax (max, sum, out) of it over its own
    keys: the holder for its local keys, the others for it as an external
    global. The partials meet in an all-reduce over the n x 2g exchanged
    slots (max first, then the rescaled sums: the log-sum-exp merge of
    `_core.merge`), and the holder merges them with its own.

Nothing with a length-L axis is moved: the collectives carry n x 2g rows,
plus GSPMD's halo for the window and the running scans' n numbers per row.
The backward is the collectives' transposes (the all-gather's is a
reduce-scatter), so the global keys' gradients return to their holders.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax import sharding
from longjax.attention import _blocks, _core
from longjax.attention.global_local import (Globals, _bias, _gather, _global_rows, _tiles,
                                            global_table)

AXIS = 'sequence'


def global_parts(qh, kh, vh, gq, gk, gv, seg, is_global, rank, start, *, num_global: int,
                 tile: int, causal: bool, bias_fn):
  """The global keys' part for every query, and the global rows, of a sequence-
  sharded `global_local` (module doc).

  qh, gq: [b, kv_heads, group, l, d] (scaled); kh, vh, gk, gv: [b, kv_heads, l,
  d]; seg, is_global, rank, start: [b, l] (`global_local.global_tokens`).
  Returns (keys Part over [b, kv_heads, group, l], rows Part likewise: the
  global queries' rows, sum 0 elsewhere).
  """
  shards = sharding.mesh_axis_size(AXIS)
  heads = None if bias_fn is not None else 'kv_heads'  # bias_fn gives every head
  q_names = ('batch', heads, None, 'length', None)
  kv_names = ('batch', heads, 'length', None)
  row_names = ('batch', 'length')
  stat_names, out_names = q_names[:4], q_names
  stat_shape, out_shape = qh.shape[:4], qh.shape

  def run(qh, kh, vh, gq, gk, gv, seg, is_global, rank, start):
    return _shard_parts(qh, kh, vh, gq, gk, gv, seg, is_global, rank, start, shards=shards,
                        num_global=num_global, tile=tile, causal=causal, bias_fn=bias_fn)

  outputs = [(stat_names, stat_shape), (stat_names, stat_shape), (out_names, out_shape)] * 2
  parts = sharding.per_shard(
      run, (qh, kh, vh, gq, gk, gv, seg, is_global, rank, start),
      (q_names, kv_names, kv_names, q_names, kv_names, kv_names) + (row_names,) * 4, outputs)
  return _core.Part(*parts[:3]), _core.Part(*parts[3:])


def _shard_parts(qh, kh, vh, gq, gk, gv, seg, is_global, rank, start, *, shards: int,
                 num_global: int, tile: int, causal: bool, bias_fn):
  """One shard's parts (inside shard_map); arrays are this shard's m positions."""
  batch, m = seg.shape
  g2 = 2 * num_global
  index = jax.lax.axis_index(AXIS)
  offset = index * m
  local_start = jnp.maximum(start - offset, 0)
  table = global_table(is_global, rank, local_start, num_global)
  tiles = _tiles(Globals(is_global, table, local_start), seg, tile=tile, one_prefix=False)

  # What this shard sends: its global tokens of its first and last segments.
  first = table[:, 0, :]
  last = jnp.take_along_axis(table, local_start[:, -1:, None], axis=1)[:, 0]
  last = jnp.where((start[:, -1] == start[:, 0])[:, None], -1, last)
  mine = jnp.concatenate([first, last], axis=1)  # [b, 2g] local positions, -1 none
  mine_valid, mine_at = mine >= 0, jnp.maximum(mine, 0)
  sent = dict(pos=jnp.where(mine_valid, mine_at + offset, -1),
              start=jnp.where(mine_valid, jnp.take_along_axis(start, mine_at, 1), -1),
              k=_take(kh, mine_at, 2), v=_take(vh, mine_at, 2), q=_take(gq, mine_at, 3))
  axes = dict(pos=1, start=1, k=2, v=2, q=3)
  everyone = {key: jax.lax.all_gather(x, AXIS, axis=axes[key], tiled=True)
              for key, x in sent.items()}  # n x 2g slots, shard-major

  # This shard's external globals: those of its first and last segments held
  # on other shards (at most g of each), compacted to 2g slots.
  owner = jnp.arange(shards * g2) // g2
  wanted = ((everyone['pos'] >= 0) & (owner != index)[None]
            & ((everyone['start'] == start[:, :1]) | (everyone['start'] == start[:, -1:])))
  order = jnp.argsort(jnp.where(wanted, 0, 1), axis=1, stable=True)[:, :g2]  # [b, 2g]
  ext_valid = jnp.take_along_axis(wanted, order, 1)
  ext_pos = jnp.take_along_axis(everyone['pos'], order, 1)
  ext_start = jnp.where(ext_valid, jnp.take_along_axis(everyone['start'], order, 1), -1)
  ext = {key: _take(everyone[key], order, axes[key]) for key in ('k', 'v', 'q')}

  keys = _keys_part(qh, kh, vh, tiles, ext_pos, ext_start, ext_valid, ext['k'], ext['v'],
                    start=start, offset=offset, causal=causal, bias_fn=bias_fn)

  # The global rows: this shard's own keys for its own global queries ...
  own_rows = _global_rows(gq, gk, gv, tiles, length=m, causal=causal, bias_fn=bias_fn)
  # ... and for the external ones, merged over the shards by log-sum-exp.
  ext_rows = _external_rows(ext['q'], gk, gv, ext_pos, ext_start, ext_valid, start=start,
                            offset=offset, tile=tile, causal=causal, bias_fn=bias_fn)
  target = jnp.where(ext_valid, order, shards * g2)  # slots of the exchange; dropped if none
  place = lambda x, fill: _to_slots(x, target, shards * g2, fill)
  best = jax.lax.pmax(jax.lax.stop_gradient(place(ext_rows.max, _core.MASK_VALUE)), AXIS)
  correction = jnp.exp(place(ext_rows.max, _core.MASK_VALUE) - best)
  total = jax.lax.psum(place(ext_rows.sum, 0.0) * correction, AXIS)
  out = jax.lax.psum(place(ext_rows.out, 0.0) * correction[..., None], AXIS)
  # This shard's sent slots of the exchange, back at their positions.
  back = jnp.where(mine_valid, mine_at, m)
  unplace = lambda x, fill: _to_slots(
      jax.lax.dynamic_slice_in_dim(x, index * g2, g2, axis=3), back, m, fill)

  remote = _core.Part(unplace(best, _core.MASK_VALUE), unplace(total, 0.0), unplace(out, 0.0))
  rows = _core.combine(own_rows, remote)
  return tuple(keys) + tuple(rows)


def _to_slots(x, target, size: int, fill):
  """x [b, hk, g, s, ...] written to slots target [b, s] of a new [b, hk, g, size,
  ...] axis (out of range: dropped), `fill` elsewhere."""
  def one(xb, tb):
    return jnp.full(xb.shape[:2] + (size,) + xb.shape[3:], fill, xb.dtype).at[:, :, tb].set(
        xb, mode='drop')
  return jax.vmap(one)(x, target)


def _take(x, index, axis):
  """x at slots index [b, s] along `axis` (x: [b, ..., l (axis), (d)])."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = index.shape
  return jnp.take_along_axis(x, index.reshape(shape), axis=axis)


def _blocked(x, n, tile, fill):
  """[b, m] -> [b, n, tile], padded with fill."""
  return _core.pad_axis(x, 1, n * tile, value=fill).reshape(x.shape[0], n, tile)


def _keys_part(qh, kh, vh, tiles, ext_pos, ext_start, ext_valid, ext_k, ext_v, *, start,
               offset, causal: bool, bias_fn) -> _core.Part:
  """Each query tile against its local global slots and the external globals."""
  batch, kv_heads, _, m, dim = qh.shape
  pos, valid, seg_slot, tile_pos, seg_tile = tiles
  n, tile = tile_pos.shape[1:]
  local_mask = valid[:, :, None, :] & (seg_tile[:, :, :, None] == seg_slot[:, :, None, :])
  local_rel = tile_pos[:, :, :, None] - pos[:, :, None, :]
  start_tile = _blocked(start, n, tile, -2)
  ext_mask = ext_valid[:, None, None, :] & (start_tile[..., None] == ext_start[:, None, None, :])
  ext_rel = (tile_pos + offset)[..., None] - ext_pos[:, None, None, :]
  mask = jnp.concatenate([local_mask, jnp.broadcast_to(ext_mask, local_mask.shape[:3] +
                                                       ext_mask.shape[3:])], axis=3)
  rel = jnp.concatenate([jnp.broadcast_to(local_rel, mask.shape[:3] + local_rel.shape[3:]),
                         jnp.broadcast_to(ext_rel, mask.shape[:3] + ext_rel.shape[3:])], axis=3)
  if causal:
    mask = mask & (rel >= 0)
  over_tiles = lambda x: jnp.broadcast_to(x[:, :, None], x.shape[:2] + (n,) + x.shape[2:])
  keys = jnp.concatenate([_gather(kh, pos, 2), over_tiles(ext_k)], axis=3)
  values = jnp.concatenate([_gather(vh, pos, 2), over_tiles(ext_v)], axis=3)
  qb = jnp.swapaxes(_core.pad_axis(qh, 3, n * tile).reshape(
      batch, kv_heads, -1, n, tile, dim), 2, 3)  # [b, hk, n, g, T, d]
  part = _blocks.attend_blocks(qb, keys, values, mask=mask[:, None, :, None],
                             bias=None if bias_fn is None else _bias(bias_fn, rel, kv_heads))
  return _core.slice_part(part, m)


def _external_rows(ext_q, gk, gv, ext_pos, ext_start, ext_valid, *, start, offset, tile: int,
                   causal: bool, bias_fn) -> _core.Part:
  """The external global queries ([b, hk, g, 2g, d]) against this shard's keys of
  their segments: one Part per slot, [b, hk, g, 2g], merged over the key tiles."""
  batch, kv_heads, m, dim = gk.shape
  n = -(-m // tile)
  tile_pos = offset + jnp.arange(n * tile).reshape(n, tile)
  mask = ext_valid[:, None, :, None] & (
      ext_start[:, None, :, None] == _blocked(start, n, tile, -2)[:, :, None, :])
  rel = ext_pos[:, None, :, None] - tile_pos[None, :, None, :]  # [b, n, 2g, T]
  if causal:
    mask = mask & (rel >= 0)
  blocks = lambda x: _core.pad_axis(x, 2, n * tile).reshape(batch, kv_heads, n, tile, dim)
  queries = jnp.broadcast_to(ext_q[:, :, None], (batch, kv_heads, n) + ext_q.shape[2:])
  part = _blocks.attend_blocks(queries, blocks(gk), blocks(gv), mask=mask[:, None, :, None],
                             bias=None if bias_fn is None else _bias(bias_fn, rel, kv_heads))
  slots = ext_q.shape[3]
  per_tile = lambda x: x.reshape(x.shape[:3] + (n, slots) + x.shape[4:])
  best = jax.lax.stop_gradient(jnp.max(per_tile(part.max), axis=3))
  correction = jnp.exp(per_tile(part.max) - best[:, :, :, None])
  return _core.Part(best, jnp.sum(per_tile(part.sum) * correction, axis=3),
                    jnp.sum(per_tile(part.out) * correction[..., None], axis=3))
