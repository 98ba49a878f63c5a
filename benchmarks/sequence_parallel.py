"""Sequence parallelism: what each kind moves between devices, per layer.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python benchmarks/sequence_parallel.py --lengths 65536,262144 --out sp.json

For each kind, on `--shards` host devices along mesh axis `sequence`, the
collectives of one attention layer's compiled forward and forward+backward
(benchmarks/collectives.py): total bytes per device, and the longest array
axis any collective moves (a length-L axis means something of the whole
sequence was gathered). Variants:
  * `gspmd`: the XLA kernels (implementation 'xla') under the mesh's axis
    rules, as a model runs them: GSPMD, plus the explicit per-shard segment
    scans of `_core.segment_bounds`;
  * `gspmd-before`: the code before sequence parallelism was worked on:
    `_core.neighbor_blocks` with a padded block axis, and no axis rules;
  * `auto`: what a model gets (implementation 'auto' under the mesh's axis
    rules): ring attention for `full` from 4 shards on, else as `gspmd` on a
    CPU (on a GPU or TPU, local and chunked take the fused kernels' halo path).
`--time` also runs each forward+backward on the host devices; they share this
machine's cores, so it is not a scaling figure.
Shape: batch 1, 4 query heads and 2 key/value heads of 64, fp32, radius 128,
16 globals, summary blocks of 16, hierarchy blocks of 64, chunks of 128.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import collectives, harness  # noqa: E402

KINDS = ('full', 'local', 'chunked', 'global_local', 'transient_global', 'hierarchical',
         'adaptive_span')
RADIUS, HEADS, KV_HEADS, DIM = 128, 4, 2, 64


def _padded_neighbor_blocks(x, *, before: int, after: int, axis: int = 1):
  """`_core.neighbor_blocks` before the sequence-parallel fix (for `gspmd-before`)."""
  import jax
  import jax.numpy as jnp
  n = x.shape[axis]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (before, after)
  padded = jnp.pad(x, widths)
  pieces = [jax.lax.slice_in_dim(padded, j, j + n, axis=axis) for j in range(before + 1 + after)]
  return jnp.concatenate(pieces, axis=axis + 1)


def _call(kind, length, causal, implementation):
  import jax.numpy as jnp
  from longjax import attention
  fn = attention.get(kind)
  settings = dict(local=dict(radius=RADIUS), chunked=dict(chunk_size=128),
                  global_local=dict(radius=RADIUS, num_global=16),
                  transient_global=dict(radius=RADIUS, summary_block=16),
                  hierarchical=dict(level0_block=64),
                  adaptive_span=dict(max_span=RADIUS, span_ramp=32.0,
                                     spans=jnp.full((HEADS,), RADIUS / 2)),
                  full={})[kind]

  def call(q, k, v, segment_ids, *summaries):
    extra = dict(summary_k=summaries[0], summary_v=summaries[1]) if summaries else {}
    return fn(q, k, v, causal=causal, segment_ids=segment_ids, implementation=implementation,
              **settings, **extra)
  return call


def measure(kind, length, shards, variant, causal, run):
  import contextlib

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from longjax import sharding
  from longjax.attention import _core
  if variant == 'gspmd-before':
    _core.neighbor_blocks = _padded_neighbor_blocks
  mesh = Mesh(np.array(jax.devices()[:shards]).reshape(1, 1, 1, shards), sharding.MESH_AXES)
  rows = NamedSharding(mesh, P(None, 'sequence', None, None))
  shapes = [((1, length, HEADS, DIM), rows), ((1, length, KV_HEADS, DIM), rows),
            ((1, length, KV_HEADS, DIM), rows)]
  seg_sharding = NamedSharding(mesh, P(None, 'sequence'))
  call = _call(kind, length, causal, 'auto' if variant == 'auto' else 'xla')
  # A model traces under the mesh's axis rules; `gspmd-before` shows the code
  # before this wave, when nothing looked at them.
  rules = lambda: (contextlib.nullcontext() if variant == 'gspmd-before'
                   else sharding.axis_rules(mesh))
  summaries = []
  if kind == 'transient_global':
    summaries = [((1, length // 16, KV_HEADS, DIM), NamedSharding(mesh, P()))] * 2
  args = ([jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh) for s, sh in shapes]
          + [jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=seg_sharding)]
          + [jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh) for s, sh in summaries])
  grad = jax.grad(lambda *a: jnp.sum(call(*a)), argnums=(0, 1, 2))
  result = dict(kind=kind, length=length, shards=shards, variant=variant, causal=causal)
  for mode, fn in (('fwd', call), ('fwdbwd', grad)):
    start = time.perf_counter()
    with rules():
      compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    result[f'{mode}_compile_s'] = time.perf_counter() - start
    result[f'{mode}_bytes'] = collectives.total_bytes(text)
    result[f'{mode}_longest_axis'] = collectives.largest_axis(text)
    result[f'{mode}_ops'] = {op: e['count'] for op, e in collectives.summary(text).items()}
    if run and mode == 'fwdbwd':
      concrete = [jax.device_put(jnp.ones(a.shape, a.dtype), a.sharding) for a in args]
      result['fwdbwd_s'] = harness.time_steps(fn, *concrete, steps=2)['median_s']
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kinds', default=','.join(KINDS))
  parser.add_argument('--lengths', default='65536,262144')
  parser.add_argument('--shards', type=int, default=8)
  parser.add_argument('--variants', default='gspmd-before,gspmd,auto')
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--time', action='store_true')
  parser.add_argument('--timeout', type=float, default=900)
  parser.add_argument('--out', default='')
  parser.add_argument('--point', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.point:
    point = json.loads(args.point)
    print(json.dumps(measure(**point)))
    return
  print(f'# {harness.machine_description()}', flush=True)
  results = []
  for length in [int(x) for x in args.lengths.split(',')]:
    for kind in args.kinds.split(','):
      for variant in args.variants.split(','):
        point = dict(kind=kind, length=length, shards=args.shards, variant=variant,
                     causal=args.causal, run=args.time)
        result = harness.run_point([os.path.abspath(__file__), '--point', json.dumps(point)],
                                   timeout=args.timeout)
        result.update(point)
        results.append(result)
        print(json.dumps(result), flush=True)
  harness.save(args.out, results)
  print(report(results))


def report(results) -> str:
  rows = []
  for r in results:
    if r.get('status') != 'ok':
      rows.append([r['kind'], r['length'], r['variant'], r.get('status'), '', '', ''])
      continue
    mib = lambda b: f'{b / 2**20:.2f} MiB'
    rows.append([r['kind'], r['length'], r['variant'], mib(r['fwd_bytes']),
                 mib(r['fwdbwd_bytes']), r['fwdbwd_longest_axis'],
                 f"{r['fwdbwd_s']:.2f} s" if 'fwdbwd_s' in r else ''])
  return harness.markdown_table(['kind', 'L', 'variant', 'fwd bytes', 'fwd+bwd bytes',
                                 'longest axis moved', 'fwd+bwd time'], rows)


if __name__ == '__main__':
  main()
