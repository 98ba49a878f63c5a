"""Where `hierarchical`'s coarse tokens live: the slot layouts of its levels.

Level l (f = 2^l tokens per coarse token, blocks of b coarse tokens) keeps
its coarse tokens in slots, blocks of b slots ("chunks"); a chunk's coarse
queries attend the LEFT and RIGHT blocks of their segment (the kernel's
`_coarse_part`). A layout says which slot a coarse token has, how level l's
slots sum level l - 1's (restriction), how level l's statistics go back down
(prolongation), and where each chunk's neighbour blocks are. Two layouts:

StaticLevels (no segment_ids: one segment from position 0): slot = the coarse
index, chunk C = block C; the neighbours are chunks C - 1 and C + 1.

SegmentLevels (packed segments, each its own hierarchy aligned to its first
token): laid out by position, so that under sequence sharding every level
moves only halos. A block spans w = b f tokens; span P is the tokens
[P w, (P + 1) w). A segment's block starts (s + k w, k = 0, 1, ...) are w
apart, so each span holds at most one block start per segment, and of the
segments that need level l (n > w, else level l - 1 covers them whole) at
most two blocks start in one span: the first block (k = 0) of the segment
that starts there, and a later block (k >= 1) of the segment covering the
span's first position (two first blocks would be two segments of length
< w; two later blocks, a segment shorter than w between them). So span P
gets two chunks, 2P + 0 (the first block starting in it) and 2P + 1 (the
later block starting in it): chunk 2P + lane, slot (2P + lane) b + r for the
block's r-th coarse token. 2 ceil(L / w) b slots, about 2L / f — what a
compact layout needs in the worst case anyway (L / w + L / (w + 1) blocks).

Neighbours: block k - 1 of a segment starts w before block k, so in span
P - 1 (lane 0 if k = 1, else lane 1), and block k + 1 in span P + 1, lane 1.
A coarse token's block starts at or before its first token and less than w
before it, so a token (or a level l - 1 slot) of span Q belongs to a level-l
slot of span Q or Q - 1: restriction is a scatter within each span plus the
next span's contributions shifted back by one span, prolongation the mirror
gather, and the neighbours are shifts by one span. All of them keep the span
axis whole, so a sequence-sharded row moves one span's halo per level (GSPMD
turns the shifts into collective-permutes), never a row of slots.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longjax.attention import _core


def _split(x, axis: int, sizes):
  """Reshapes axis `axis` of x into `sizes`."""
  return x.reshape(x.shape[:axis] + tuple(sizes) + x.shape[axis + 1:])


def _merge(x, axis: int, count: int):
  """Merges `count` axes from `axis` on into one."""
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + count:])


def window_ok(layout, level: int, *, causal: bool):
  """[batch or 1, K, W]: the window's key slot is a coarse token of the query
  chunk's segment (its neighbour block exists there and the slot is not empty)."""
  key = layout.segment_key(level)  # [batch or 1, size]: 0 for an empty slot
  window = layout.window(key, level, 1, causal=causal)
  chunk = key.reshape(key.shape[0], -1, layout.block).max(axis=2)  # [., K]
  return (window > 0) & (window == chunk[:, :, None])


class StaticLevels:
  """One segment from position 0: slot = coarse index (see the module docstring)."""

  def __init__(self, length: int, block: int, levels: int):
    self.length, self.block, self.levels = length, block, levels

  def chunks(self, level: int) -> int:
    return -(-self.length // (self.block * 2 ** level))

  def size(self, level: int) -> int:
    return self.length if level == 0 else self.chunks(level) * self.block

  def count(self, level: int):
    """[1, size] float32: tokens per slot."""
    starts = np.arange(self.size(level)) * 2 ** level
    return jnp.asarray(np.clip(self.length - starts, 0, 2 ** level), jnp.float32)[None]

  def segment_key(self, level: int):
    """[1, size]: 1 for a slot with tokens (shifts bring 0 past the ends)."""
    return (self.count(level) > 0).astype(jnp.int32)

  def coarsen(self, x, level: int, axis: int, *, first_only: bool = False):
    """Level l's slot sums (or the first child's value) of level l - 1's."""
    size = self.size(level)
    x = _core.pad_axis(x, axis, 2 * size)
    if first_only:
      return jax.lax.slice_in_dim(x, 0, 2 * size, stride=2, axis=axis)
    return _split(x, axis, (size, 2)).sum(axis=axis + 1)

  def interpolate(self, part: _core.Part, level: int) -> _core.Part:
    """Level l's statistics [.., size(l)] handed to level l - 1's slots."""
    size = self.size(level - 1)
    up = lambda x: jax.lax.slice_in_dim(jnp.repeat(x, 2, axis=3), 0, size, axis=3)
    return _core.Part(up(part.max), up(part.sum), up(part.out))

  def window(self, x, level: int, axis: int, *, causal: bool = False):
    """[.., size (axis), ..] -> [.., K, W, ..]: each chunk's LEFT (, RIGHT) block."""
    blocked = _split(x, axis, (self.chunks(level), self.block))
    left = _core.shift(blocked, axis, 1)
    if causal:
      return left
    return jnp.concatenate([left, _core.shift(blocked, axis, -1)], axis=axis + 1)


class SegmentLevels:
  """Every segment its own hierarchy, slots laid out by position (module docstring)."""

  def __init__(self, segment_ids, block: int, levels: int):
    self.block, self.levels = block, levels
    self.batch, self.length = segment_ids.shape
    start, end = _core.segment_bounds(segment_ids)
    self.start = start  # [batch, length]: each token's segment start (level 0's too)
    self._chunk = [None] + [self._chunk_table(start, end - start, level)
                            for level in range(1, levels + 1)]
    self._targets = [None, self._token_targets(start, end - start) if levels else None]
    for level in range(2, levels + 1):
      self._targets.append(self._child_targets(level))

  def spans(self, level: int) -> int:
    return -(-self.length // (self.block * 2 ** level))

  def chunks(self, level: int) -> int:
    return 2 * self.spans(level)

  def size(self, level: int) -> int:
    return self.length if level == 0 else self.chunks(level) * self.block

  def _chunk_table(self, start, n, level: int):
    """Per chunk [batch, K]: its segment's start and length, its block index k,
    and whether it holds a block at all."""
    w, l = self.block * 2 ** level, self.length
    span_start = jnp.asarray(np.arange(self.spans(level)) * w)[None]
    # Lane 1: the segment covering the span's first position, when one of its
    # later blocks starts in the span. Lane 0: the segment of the span's last
    # position, when it starts in the span (a segment starting there that
    # needs the level runs past the span's end).
    s1, n1 = start[:, ::w], n[:, ::w]
    last = lambda x: jnp.concatenate([x[:, w - 1::w], x[:, -1:]], axis=1)[:, :self.spans(level)]
    s0, n0 = (last(start), last(n)) if l % w else (start[:, w - 1::w], n[:, w - 1::w])
    k1 = (span_start - s1 + w - 1) // w
    valid0 = (s0 >= span_start) & (n0 > w)
    valid1 = (s1 < span_start) & (n1 > w) & (k1 * w < n1)
    lanes = lambda a, c: jnp.stack([a, c], axis=2).reshape(self.batch, -1)
    return dict(start=lanes(s0, s1), n=lanes(n0, n1), k=lanes(jnp.zeros_like(k1), k1),
                valid=lanes(valid0, valid1))

  def _coarse_index(self, level: int):
    """[batch, K, b]: each slot's coarse index in its segment, and its token count."""
    table, f = self._chunk[level], 2 ** level
    c = table['k'][:, :, None] * self.block + jnp.arange(self.block)[None, None]
    count = jnp.where(table['valid'][:, :, None], jnp.clip(table['n'][:, :, None] - c * f, 0, f),
                      0)
    return c, count

  def _target(self, start, n, c, source_span, level: int):
    """Where a level-(l-1) item (coarse index c of its segment, in span
    source_span of level l) goes: its level-l slot relative to span
    source_span (own span: 0 .. 2b, the span before: 2b .. 4b); 4b: nowhere."""
    b, w = self.block, self.block * 2 ** level
    parent = c // 2
    k = parent // b
    span = (start + k * w) // w
    target = (source_span - span) * 2 * b + jnp.where(k >= 1, b, 0) + parent % b
    return target, n > w

  def _token_targets(self, start, n):
    """Level 1 from the tokens, grouped by span ([batch, S_1, 2b] targets)."""
    b, w = self.block, 2 * self.block
    pos = jnp.arange(self.length, dtype=jnp.int32)[None]
    rel = pos - start
    target, needs = self._target(start, n, rel, pos // w, 1)
    target = jnp.where(needs, target, 4 * b)
    padded = self.spans(1) * w
    group = lambda x, fill: _core.pad_axis(x, 1, padded, fill).reshape(self.batch, -1, w)
    return group(target, 4 * b), group(rel % 2 == 0, False)

  def _child_targets(self, level: int):
    """Level l from level l - 1's slots, grouped by level-l span ([batch, S_l, 4b])."""
    b, child = self.block, self._chunk[level - 1]
    c, count = self._coarse_index(level - 1)  # [batch, K_{l-1}, b]
    source_span = jnp.asarray(np.arange(self.chunks(level - 1)) // 4)[None, :, None]
    target, needs = self._target(child['start'][:, :, None], child['n'][:, :, None], c,
                                 source_span, level)
    target = jnp.where(needs & (count > 0), target, 4 * b)
    chunks = 2 * self.chunks(level)  # level l - 1 chunks of its spans
    group = lambda x, fill: _core.pad_axis(x, 1, chunks, fill).reshape(self.batch, -1, 4 * b)
    return group(target, 4 * b), group(c % 2 == 0, False)

  def count(self, level: int):
    """[batch, size] float32: tokens per slot."""
    return self._coarse_index(level)[1].reshape(self.batch, -1).astype(jnp.float32)

  def segment_key(self, level: int):
    """[batch, size]: 1 + the slot's segment start; 0 for an empty slot."""
    table = self._chunk[level]
    key = jnp.repeat(table['start'] + 1, self.block, axis=1)
    return jnp.where(self.count(level) > 0, key, 0)

  def coarsen(self, x, level: int, axis: int, *, first_only: bool = False):
    """Level l's slot sums (or the first child's value) of level l - 1's slots
    (the tokens for l = 1), x: [batch, ..., size(l - 1) (axis), ...]."""
    b, spans = self.block, self.spans(level)
    target, first = self._targets[level]
    if first_only:
      target = jnp.where(first, target, 4 * b)
    items = target.shape[2]
    x = jnp.moveaxis(_core.pad_axis(x, axis, spans * items), axis, 1)
    x = _split(x, 1, (spans, items))  # [batch, S, items, ...]
    zeros = jnp.zeros((4 * b,) + x.shape[3:], x.dtype)
    scatter = lambda xs, ts: zeros.at[ts].add(xs, mode='drop')
    y = jax.vmap(jax.vmap(scatter))(x, target)  # [batch, S, 4b, ...]
    y = y[:, :, :2 * b] + _core.shift(y[:, :, 2 * b:], 1, -1)  # the span before's, from the next
    return jnp.moveaxis(_merge(y, 1, 2), 1, axis)

  def interpolate(self, part: _core.Part, level: int) -> _core.Part:
    """Level l's statistics [batch, kv_heads, group, size(l)(, d)] handed to
    level l - 1's slots (the tokens for l = 1): the mirror of `coarsen`."""
    b, spans, size = self.block, self.spans(level), self.size(level - 1)
    target = self._targets[level][0]

    def down(x, fill):
      x = _split(jnp.moveaxis(x, 3, 1), 1, (spans, 2 * b))  # [batch, S, 2b, ...]
      empty = jnp.full(x.shape[:2] + (1,) + x.shape[3:], fill, x.dtype)
      # Its own span's slots, the span before's, and an empty one.
      source = jnp.concatenate([x, _core.shift(x, 1, 1), empty], axis=2)
      y = jax.vmap(jax.vmap(lambda s, t: s[t]))(source, target)  # [batch, S, items, ...]
      y = jax.lax.slice_in_dim(_merge(y, 1, 2), 0, size, axis=1)
      return jnp.moveaxis(y, 1, 3)

    return _core.Part(down(part.max, _core.MASK_VALUE), down(part.sum, 0.0),
                      down(part.out, 0.0))

  def window(self, x, level: int, axis: int, *, causal: bool = False):
    """[.., size (axis), ..] -> [.., K, W, ..]: each chunk's LEFT (, RIGHT) block
    of its segment: block k - 1 in the span before (lane 0 for k = 1, else lane
    1), block k + 1 in lane 1 of the span after."""
    spans = self.spans(level)
    blocked = _split(x, axis, (spans, 2, self.block))  # [.., S, lane, b, ..]
    lane = lambda y, i: jnp.take(y, i, axis=axis + 1)
    # Each span picks the lane its successor's later block needs before
    # sending it, so one block per direction crosses a shard boundary.
    k = self._chunk[level]['k'].reshape(self.batch, spans, 2)[:, :, 1]
    needs_first = _core.shift(k == 1, 1, -1).reshape(
        (self.batch,) + (1,) * (axis - 1) + (spans,) + (1,) * (x.ndim - axis))
    left = _core.shift(jnp.where(needs_first, lane(blocked, 0), lane(blocked, 1)), axis, 1)
    left = jnp.stack([jnp.zeros_like(left), left], axis=axis + 1)  # a first block: none
    blocks = lambda y: _merge(y, axis, 2)  # [.., K, b, ..]
    if causal:
      return blocks(left)
    after = _core.shift(lane(blocked, 1), axis, -1)
    right = jnp.stack([after, after], axis=axis + 1)
    return jnp.concatenate([blocks(left), blocks(right)], axis=axis + 1)


def layout(segment_ids, length: int, block: int, levels: int):
  """The level layout for these inputs (SegmentLevels with segment_ids)."""
  if segment_ids is None:
    return StaticLevels(length, block, levels)
  return SegmentLevels(segment_ids, block, levels)

