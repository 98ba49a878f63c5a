"""What a compiled program moves between devices: collectives in its HLO text.

Used by benchmarks/sequence_parallel.py and by the tests that assert a
communication pattern (tests/train/test_sequence_parallel.py). Each collective
is counted once, by the bytes of its result on one device: an all-gather's
gathered array, a collective-permute's received block, an all-reduce's
reduced array. A collective inside a loop counts once per iteration (XLA's
known trip count). Async pairs (`-start`/`-done`) count at their start; a
collective whose replica groups are single devices (what a transpose inserts
for mesh axes of size 1) moves nothing and is not counted.

Note: the CPU backend moves bf16 collectives as f32 (measured in the kernels
study), so bytes measured here for bf16 programs are twice a GPU's or TPU's.
"""
from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2,
          's16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1}
_OPS = ('all-gather', 'collective-permute', 'all-reduce', 'all-to-all', 'reduce-scatter')
_LINE = re.compile(r'= (\(?[^=]*?\)?) (' + '|'.join(_OPS) + r')(-start)?\(')
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
_GROUPS = re.compile(r'replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}')


class Collective(NamedTuple):
  op: str
  bytes: int
  shapes: tuple[str, ...]


def _nbytes(dtype: str, dims: str) -> int:
  return _BYTES.get(dtype, 4) * math.prod(int(x) for x in dims.split(',') if x)


_COMPUTATION = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{$')
_CALLEE = re.compile(r'(body|calls|to_apply|branch_computations|called_computations)=\{?'
                     r'((?:%[\w.\-]+(?:, )?)+)\}?')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo_text: str):
  """{name: its instruction lines} and the entry computation's name."""
  bodies, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(2)
      bodies[current] = []
      if match.group(1):
        entry = current
    elif current is not None and line.startswith('  '):
      bodies[current].append(line)
  return bodies, entry


def _executions(bodies, entry) -> dict[str, int]:
  """How many times each computation runs per call of the entry: a while
  body its known trip count times (a loop without one counts once)."""
  runs = {entry: 1}
  order = [entry]
  for name in order:
    for line in bodies.get(name, ()):
      trip = _TRIP_COUNT.search(line)
      for kind, callees in _CALLEE.findall(line):
        times = int(trip.group(1)) if kind == 'body' and trip else 1
        for callee in re.findall(r'%([\w.\-]+)', callees):
          if callee not in runs:
            order.append(callee)
          runs[callee] = runs.get(callee, 0) + runs[name] * times
  return runs


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective a compiled module (`compiled.as_text()`) executes, once per
  execution: one inside a loop of known trip count n appears n times."""
  bodies, entry = _computations(hlo_text)
  runs = _executions(bodies, entry) if entry else {}
  found = []
  for name, lines in (bodies.items() if entry else [(None, hlo_text.splitlines())]):
    times = runs.get(name, 0) if entry else 1
    for line in lines:
      for match in _LINE.finditer(line):
        groups = _GROUPS.search(line, match.end())
        if groups and all(',' not in g for g in re.findall(r'\{([\d,]*)\}', groups.group(1))):
          continue  # every group is one device: nothing moves
        shapes = _SHAPE.findall(match.group(1))
        if match.group(3) and len(shapes) > 1:  # an async start returns (operand, result, ...)
          shapes = shapes[1:2]
        found += [Collective(match.group(2), sum(_nbytes(t, d) for t, d in shapes),
                             tuple(f'{t}[{d}]' for t, d in shapes))] * times
  return found


def summary(hlo_text: str) -> dict[str, dict]:
  """{op: {'count', 'bytes', 'shapes'}} of a compiled module."""
  out = collections.defaultdict(lambda: dict(count=0, bytes=0, shapes=set()))
  for c in collectives(hlo_text):
    entry = out[c.op]
    entry['count'] += 1
    entry['bytes'] += c.bytes
    entry['shapes'].update(c.shapes)
  return {op: dict(e, shapes=sorted(e['shapes'])) for op, e in out.items()}


def total_bytes(hlo_text: str) -> int:
  return sum(c.bytes for c in collectives(hlo_text))


def largest_axis(hlo_text: str) -> int:
  """The longest dimension of any array a collective moves (0 if none)."""
  longest = 0
  for c in collectives(hlo_text):
    for shape in c.shapes:
      dims = shape[shape.index('[') + 1:-1]
      longest = max([longest] + [int(x) for x in dims.split(',') if x])
  return longest
