"""LM training step (forward + backward [+ optimizer]) vs length: tokens/s, memory, MFU.

    python benchmarks/model.py --kinds=local,global_local --lengths=1024,8192,65536 \
        --dtypes=float32,bfloat16 --out=model.json

Shape (the issue's and the peer benchmark's): d=256, 4 heads, 4 layers, mlp
1024, batch 1, byte vocabulary (259). Each point runs in a fresh process
(benchmarks/harness.py). The step is jax.value_and_grad of the next-token
loss w.r.t. all parameters, the loss computed as the trainer does
(`steps.token_scores`, over `--tile-tokens` tiles: the model's
`tile_tokens`); `--optimizer=adamw` adds the AdamW update (optax), as a
training step has. `--remat` other than none sets XLA's CPU scheduler as
`longjax.main` does (longjax/hostmem.py).

Model FLOPs count what the architecture needs, not what the kernels execute:
  6 * (matmul weights) per token for projections, MLP and LM head, plus
  attention 12 * heads * head_dim * (keys a query sees, averaged over queries)
  per token and layer (QK^T and PV, forward and backward).
`--sequence=8` splits the tokens over 8 devices (with XLA_FLAGS=
--xla_force_host_platform_device_count=8 on a CPU: one process, so peak RSS
is all shards together).
MFU is model FLOP/s over the machine's dense matmul peak, measured in the
same run by timing a 2048^3 matmul in each dtype. XLA's own FLOP count (what
the compiled step executes, masked tile waste included) is reported beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

KINDS = ('full', 'local', 'global_local', 'transient_global', 'hierarchical', 'multiresolution',
         'adaptive_span', 'chunked')
# Kind settings: radius 128 like the attention benchmark; LongT5's summary
# block of 16; a hierarchy block of 64.
SETTINGS = dict(radius=128, num_global=16, max_span=128, span_ramp=32.0)
BLOCKS = dict(summary_block=16, level0_block=64, chunk_size=128)


def model_config(kind, length, dtype, args):
  from longjax import models
  return models.ModelConfig.from_config(dict(
      arch='lm', num_layers=args.layers, emb_dim=args.hidden, num_heads=args.heads,
      mlp_dim=args.mlp, vocab_size=args.vocab, max_len=max(length, 2048), dtype=dtype,
      param_dtype='float32', remat=args.remat, tile_tokens=args.tile_tokens,
      attention=dict(kind=kind, **BLOCKS, **SETTINGS)))


def keys_per_query(kind: str, length: int) -> float:
  """Keys (fine or pooled) a causal query attends, averaged over positions."""
  i = np.arange(length)
  r, g = SETTINGS['radius'], SETTINGS['num_global']
  window = np.minimum(i, r) + 1
  if kind == 'full':
    return float(np.mean(i + 1))
  if kind in ('local',):
    return float(np.mean(window))
  if kind == 'adaptive_span':
    return float(np.mean(np.minimum(i, SETTINGS['max_span']) + 1))
  if kind == 'global_local':
    return float(np.mean(window + np.minimum(np.maximum(i - r, 0), g)))
  if kind == 'transient_global':
    return float(np.mean(window + (i + 1) // BLOCKS['summary_block']))
  if kind == 'chunked':
    return float(np.mean(i % BLOCKS['chunk_size'] + 1))
  if kind in ('hierarchical', 'multiresolution'):  # the same keys per query (coarse or exact)
    from longjax.attention.hierarchical import num_levels
    b = BLOCKS['level0_block']
    total = (i % b) + 1 + np.where(i >= b, b, 0)  # level 0: own block so far + previous
    for level in range(1, num_levels(length, b) + 1):
      w = b * 2 ** level
      lo = (i // w - 1) * b                       # coarse keys of the level window start
      finer_lo = (i // (w // 2) - 1) * (b // 2)   # the finer level's region start
      total += np.maximum(finer_lo - np.maximum(lo, 0), 0)  # causal: keys before the finer region
    return float(np.mean(total))
  raise ValueError(kind)


def model_flops_per_step(config, length: int, batch: int) -> float:
  e, h, hk, d, m, v = (config.emb_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                       config.mlp_dim, config.vocab_size)
  weights = config.num_layers * (e * h * d * 2 + e * hk * d * 2 + 3 * e * m) + e * v
  attention = config.num_layers * 12 * h * d * keys_per_query(config.attention.kind, length)
  return batch * length * (6 * weights + attention)


def run_point(args):
  from longjax import hostmem
  hostmem.use_remat_scheduler(args.remat)  # as longjax.main does; before JAX starts
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from longjax import models
  config = model_config(args.kind, args.length, args.dtype, args)
  model = models.build(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.length + 1)),
                    jnp.int32)
  inputs, targets = ids[:, :-1], ids[:, 1:]

  from longjax.train import steps
  settings = steps.StepSettings(seq2seq=False, seed=0, dropout=False,
                                tile_tokens=config.tile_tokens)

  def loss(params, inputs, targets):
    model = nnx.merge(graphdef, params)
    x, aux = model.hidden(inputs)
    nll, _, _ = steps.token_scores(model.embedder, x, targets, settings)
    return jnp.mean(nll) + 0.0 * aux.get('span_penalty', 0.0)

  step, state = jax.value_and_grad(loss), (params,)
  if args.optimizer == 'adamw':  # the step replaced by one with the update
    import optax
    tx = optax.adamw(1e-4)

    def adamw_step(params, opt_state, inputs, targets):
      value, grads = jax.value_and_grad(loss)(params, inputs, targets)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    step, state = adamw_step, (params, tx.init(params))

  rules = contextlib.nullcontext()
  if args.sequence > 1:  # the tokens split over `sequence` host devices, as the trainer does
    from jax.sharding import NamedSharding, PartitionSpec
    from longjax import sharding
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=args.sequence),
                              devices=jax.devices()[:args.sequence])
    rows = NamedSharding(mesh, PartitionSpec(None, 'sequence'))
    inputs, targets = jax.device_put(inputs, rows), jax.device_put(targets, rows)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    rules = sharding.axis_rules(mesh)
  with rules:
    result = harness.time_steps(step, *state, inputs, targets, steps=args.steps,
                                min_seconds=args.min_seconds)
  flops = model_flops_per_step(config, args.length, args.batch)
  result.update(kind=args.kind, length=args.length, dtype=args.dtype,
                tokens_per_s=args.batch * args.length / result['median_s'],
                model_flops=flops, model_flops_per_s=flops / result['median_s'])
  print(json.dumps(result))


def run_peak(args):
  """Dense matmul peak of this machine in args.dtype (FLOP/s)."""
  import jax
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), args.dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), args.dtype)
  result = harness.time_steps(lambda a, b: a @ b, a, b, steps=10, min_seconds=2.0)
  print(json.dumps(dict(peak_flops_per_s=2 * n ** 3 / result['min_s'], dtype=args.dtype)))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kinds', default=','.join(KINDS))
  parser.add_argument('--lengths', default='1024,2048,4096,8192,16384,32768,65536')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--mlp', type=int, default=1024)
  parser.add_argument('--vocab', type=int, default=259)
  parser.add_argument('--remat', default='none')
  parser.add_argument('--tile-tokens', type=int, default=-1,
                      help="model.tile_tokens (-1: the model's automatic tiles; 0: untiled)")
  parser.add_argument('--optimizer', choices=['none', 'adamw'], default='none')
  parser.add_argument('--sequence', type=int, default=1,
                      help='split the length over this many devices (mesh.sequence); on a CPU '
                           'set XLA_FLAGS=--xla_force_host_platform_device_count=N')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--min-seconds', type=float, default=2.0)
  parser.add_argument('--timeout', type=float, default=600)
  parser.add_argument('--mem-cap-gb', type=float, default=20)
  harness.add_hugepages_flag(parser)
  parser.add_argument('--out', default='')
  parser.add_argument('--point', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--point-kind', choices=['step', 'peak'], help=argparse.SUPPRESS)
  parser.add_argument('--kind', help=argparse.SUPPRESS)
  parser.add_argument('--length', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--dtype', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.point:
    return run_peak(args) if args.point_kind == 'peak' else run_point(args)

  shape = [f'--batch={args.batch}', f'--hidden={args.hidden}', f'--heads={args.heads}',
           f'--layers={args.layers}', f'--mlp={args.mlp}', f'--vocab={args.vocab}',
           f'--remat={args.remat}', f'--tile-tokens={args.tile_tokens}',
           f'--optimizer={args.optimizer}', f'--sequence={args.sequence}', f'--steps={args.steps}',
           f'--min-seconds={args.min_seconds}']
  me = os.path.abspath(__file__)
  print(f'# {harness.machine_description()}', flush=True)
  peaks = {}
  for dtype in args.dtypes.split(','):
    peak = harness.run_point([me, '--point', '--point-kind=peak', f'--dtype={dtype}'],
                             timeout=120, hugepages=args.hugepages == 'on')
    peaks[dtype] = peak.get('peak_flops_per_s')
    print(f'# matmul peak {dtype}: {peaks[dtype] / 1e9:.1f} GFLOP/s', flush=True)
  series = [dict(dtype=dtype, kind=kind) for dtype in args.dtypes.split(',')
            for kind in args.kinds.split(',')]
  results = harness.sweep(me, series, [int(x) for x in args.lengths.split(',')],
                          ['--point-kind=step'] + shape, timeout=args.timeout,
                          mem_cap_gb=args.mem_cap_gb, hugepages=args.hugepages == 'on',
                          show=('median_s', 'tokens_per_s', 'model_flops_per_s', 'peak_rss_gb',
                                'xla_temp_bytes'))
  for row in results:
    if row['status'] == 'ok' and peaks.get(row['dtype']):
      row['mfu'] = row['model_flops_per_s'] / peaks[row['dtype']]
  harness.save(args.out, results, peaks=peaks)
  print(report(results, peaks))


def report(results, peaks) -> str:
  """Markdown, one table per dtype: tokens/s, peak RSS and MFU per kind and length."""
  out = []
  for dtype in dict.fromkeys(r['dtype'] for r in results):
    peak = peaks.get(dtype) or 0
    out.append(f'\n{dtype} (matmul peak {peak / 1e9:.1f} GFLOP/s): tokens/s, peak RSS, MFU\n')
    out.append(harness.length_table(
        [r for r in results if r['dtype'] == dtype], 'kind',
        lambda r: (f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_rss_gb']:.2f} GB, "
                   f"MFU {100 * r.get('mfu', 0):.0f}%")))
  return '\n'.join(out)


if __name__ == '__main__':
  main()
