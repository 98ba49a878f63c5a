"""Attention kernels: forward and forward+backward time and memory vs length.

    python benchmarks/attention.py --lengths 1024,4096,16384,65536 --out attention.json

Each (kind, length, mode) point runs in a fresh process (benchmarks/harness.py):
batch 1, 8 heads of 64, radius 128, fp32 by default. `dense` is
jax.nn.dot_product_attention (XLA) for comparison. Reported: median step
time, tokens/s, the process's peak RSS and XLA's planned temporary memory.
Results go to BENCHMARKS.md by hand, with the command and the machine.

    python benchmarks/attention.py --implementations=splash,pallas_gpu --lengths 1024,4096

adds, for every kind that lists them, the accelerator kernels run by the
Pallas interpreter (on CPU) against the XLA kernel on the same inputs: the
max |error| of the output and of the gradients. It is a correctness column
only: interpret mode says nothing about a kernel's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

KINDS = ('dense', 'full', 'local', 'global_local', 'transient_global', 'hierarchical',
         'multiresolution', 'adaptive_span', 'chunked')


def kernel(kind: str, args, implementation: str = 'auto'):
  """A function (q, k, v) -> out for `kind` with the benchmark's settings."""
  import jax
  import jax.numpy as jnp
  from longjax import attention
  causal = args.causal
  if kind == 'dense':
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation='xla')
  if kind == 'full':
    return lambda q, k, v: attention.dot_product(q, k, v, causal=causal,
                                                 implementation=implementation)
  fn = attention.get(kind)
  kwargs = dict(
      local=dict(radius=args.radius),
      global_local=dict(radius=args.radius, num_global=args.num_global),
      transient_global=dict(radius=args.radius, summary_block=args.summary_block),
      hierarchical=dict(level0_block=args.hierarchy_block),
      multiresolution=dict(level0_block=args.hierarchy_block),
      adaptive_span=dict(max_span=args.radius, span_ramp=32.0,
                         spans=jnp.full((args.heads,), args.radius / 2)),
      chunked=dict(chunk_size=args.radius),
  )[kind]
  if kind == 'transient_global':  # the model forms summaries from its inputs; here block means
    block = args.summary_block

    def with_summaries(q, k, v):
      b, length, h, d = k.shape
      g = length // block
      means = lambda x: x[:, :g * block].reshape(b, g, block, h, d).mean(axis=2)
      return fn(q, k, v, causal=causal, summary_k=means(k), summary_v=means(v),
                implementation=implementation, **kwargs)

    return with_summaries
  return lambda q, k, v: fn(q, k, v, causal=causal, implementation=implementation, **kwargs)


def run_one(args):
  """Inside the point's process: build inputs, time, print one JSON line."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(args.dtype)
  shape = (args.batch, args.length, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
  fn = kernel(args.kind, args)
  if args.mode == 'fwd':
    step = fn
  else:
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
    step = jax.grad(loss, argnums=(0, 1, 2))
  result = harness.time_steps(step, q, k, v, steps=args.steps)
  result.update(kind=args.kind, length=args.length, mode=args.mode, dtype=args.dtype,
                tokens_per_s=args.batch * args.length / result['median_s'])
  print(json.dumps(result))


def implementation_check(args) -> str:
  """Max |error| of each accelerated implementation against 'xla' (interpreted on CPU)."""
  import jax
  import jax.numpy as jnp
  from longjax import attention
  rows = []
  for kind in args.kinds.split(','):
    if kind == 'dense':
      continue
    wanted = [i for i in args.implementations.split(',')
              if i in attention.spec(kind).implementations]
    for implementation in wanted:
      for length in [int(x) for x in args.lengths.split(',')]:
        shape = (args.batch, length, args.heads, args.head_dim)
        keys = jax.random.split(jax.random.key(length), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.dtype(args.dtype)) for key in keys)
        errors = []
        for mode in ('fwd', 'grad'):
          outs = []
          for impl in (implementation, 'xla'):
            fn = kernel(kind, args, impl)
            if mode == 'grad':
              fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2),
                            argnums=(0, 1, 2))
            outs.append(jax.tree.leaves(jax.jit(fn)(q, k, v)))
          errors.append(max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                            for a, b in zip(*outs)))
        rows.append([kind, implementation, length, f'{errors[0]:.1e}', f'{errors[1]:.1e}'])
        print(f'# checked {kind} {implementation} L={length}', flush=True)
  return ('\ninterpreted accelerator kernels against xla (correctness only, not speed): '
          'max |error|\n\n' + harness.markdown_table(
              ['kind', 'implementation', 'length', 'forward', 'gradient'], rows))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kinds', default=','.join(KINDS))
  parser.add_argument('--lengths', default='1024,4096,16384,65536')
  parser.add_argument('--modes', default='fwd,fwdbwd')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--radius', type=int, default=128)
  parser.add_argument('--num-global', type=int, default=16)
  parser.add_argument('--summary-block', type=int, default=16,
                      help='transient_global block size (LongT5 uses 16)')
  parser.add_argument('--hierarchy-block', type=int, default=64)
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--timeout', type=float, default=300)
  parser.add_argument('--mem-cap-gb', type=float, default=20)
  harness.add_hugepages_flag(parser)
  parser.add_argument('--implementations', default='',
                      help="e.g. 'splash,pallas_gpu': only check them against 'xla' "
                           '(interpreted on CPU; correctness, not speed)')
  parser.add_argument('--out', default='')
  # Internal: run a single point in this process.
  parser.add_argument('--point', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--kind', help=argparse.SUPPRESS)
  parser.add_argument('--length', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--mode', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.point:
    return run_one(args)
  if args.implementations:
    print(f'# {harness.machine_description()}', flush=True)
    print(implementation_check(args))
    return

  passthrough = [f'--dtype={args.dtype}', f'--batch={args.batch}', f'--heads={args.heads}',
                 f'--head-dim={args.head_dim}', f'--radius={args.radius}',
                 f'--num-global={args.num_global}', f'--summary-block={args.summary_block}',
                 f'--hierarchy-block={args.hierarchy_block}', f'--steps={args.steps}']
  if args.causal:
    passthrough.append('--causal')
  print(f'# {harness.machine_description()}', flush=True)
  series = [dict(kind=kind, mode=mode) for kind in args.kinds.split(',')
            for mode in args.modes.split(',')]
  results = harness.sweep(os.path.abspath(__file__), series,
                          [int(x) for x in args.lengths.split(',')], passthrough,
                          timeout=args.timeout, mem_cap_gb=args.mem_cap_gb,
                          hugepages=args.hugepages == 'on',
                          show=('median_s', 'tokens_per_s', 'peak_rss_gb', 'xla_temp_bytes'))
  harness.save(args.out, results)
  print(report(results))


def report(results) -> str:
  """Markdown: one table per mode, time and memory per kind and length."""
  def cell(r):
    temp = (r.get('xla_temp_bytes') or 0) / 2**20
    return f"{r['median_s'] * 1e3:.1f} ms / {temp:.0f} MiB / {r['peak_rss_gb']:.2f} GB"

  out = []
  for mode in dict.fromkeys(r['mode'] for r in results):
    out.append(f'\n{mode}: median time / XLA temp memory / peak process RSS\n')
    out.append(harness.length_table([r for r in results if r['mode'] == mode], 'kind', cell))
  return '\n'.join(out)


if __name__ == '__main__':
  main()
