"""Decoding: generated tokens/s and cache memory vs prompt length, full vs local attention.

    python benchmarks/decode.py --lengths 1024,4096,16384,32768 --out decode.json

A small decoder-only LM (2 layers, d=256, 4 heads of 64, radius 128, fp32 by
default) continues a prompt of each length. Each (kind, length, mode) point
runs in a fresh process (benchmarks/harness.py):
  * decode: the jitted generation loop (`longjax.decode.search.sample_loop`,
    greedy, --decode-tokens tokens) from a cache holding `length` prompt
    positions (filled from random keys and values by the same code the
    prefill uses, so that the point measures decoding alone); reported:
    generated tokens/s, ms per token, and the bytes of every cache array;
  * prefill: the model's forward over the prompt that fills the caches
    (`TransformerLM.prefill`, the blocked kernels), for comparison.
Results go to BENCHMARKS.md by hand, with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

KINDS = ('full', 'local')


def model_config(args, kind: str, max_len: int):
  from longjax import models
  return models.ModelConfig.from_config(dict(
      arch='lm', num_layers=args.layers, emb_dim=args.heads * args.head_dim,
      num_heads=args.heads, mlp_dim=4 * args.heads * args.head_dim, vocab_size=259,
      max_len=max_len, dtype=args.dtype, param_dtype='float32',
      attention=dict(kind=kind, radius=args.radius)))


def run_one(args):
  """Inside the point's process: build, time, print one JSON line."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from longjax import models
  from longjax.decode import search
  from longjax.models import cache as kv_cache

  steps = args.decode_tokens
  max_length = args.length + steps - 1
  config = model_config(args, args.kind, max_length)
  model = models.build(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  lengths = jnp.full((args.batch,), args.length, jnp.int32)
  result = dict(kind=args.kind, length=args.length, mode=args.mode, dtype=args.dtype,
                batch=args.batch, kv_cache_dtype=args.kv_cache_dtype)

  if args.mode == 'prefill':
    prompt = jax.random.randint(jax.random.key(0), (args.batch, args.length), 3, 259)

    def prefill(params, prompt):
      return nnx.merge(graphdef, params).prefill(prompt, lengths, max_length=max_length,
                                                 cache_dtype=args.kv_cache_dtype)

    result.update(harness.time_steps(prefill, params, prompt, steps=args.steps))
    result['cache_bytes'] = kv_cache.nbytes(jax.eval_shape(prefill, params, prompt)[1])
    result['prompt_tokens_per_s'] = args.batch * args.length / result['median_s']
  else:
    shape = (args.batch, args.length, config.num_kv_heads, config.head_dim)
    keys = jax.random.split(jax.random.key(1), 2 * config.num_layers)
    q_shape = (args.batch, args.length, config.num_heads, config.head_dim)
    caches = [kv_cache.from_prompt(block.attention.cache_layout(max_length),
                                   jax.random.normal(keys[2 * i], shape, config.dtype),
                                   jax.random.normal(keys[2 * i + 1], shape,
                                                     config.dtype), lengths,
                                   queries=jnp.zeros(q_shape, config.dtype),
                                   cache_dtype=args.kv_cache_dtype)
              for i, block in enumerate(model.decoder.layers)]
    first_logits = jnp.zeros((args.batch, config.vocab_size), jnp.float32)

    def generate(params, caches, first_logits):
      model = nnx.merge(graphdef, params)
      out = search.sample_loop(model.decode_step, first_logits, caches, start_positions=lengths,
                               max_decode_len=steps, eos_id=None)
      return out.tokens, out.cache

    result.update(harness.time_steps(generate, params, caches, first_logits, steps=args.steps))
    result['cache_bytes'] = kv_cache.nbytes(caches)
    result['tokens_per_s'] = args.batch * steps / result['median_s']
    result['ms_per_token'] = 1e3 * result['median_s'] / steps
  print(json.dumps(result))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kinds', default=','.join(KINDS))
  parser.add_argument('--lengths', default='1024,4096,16384,32768')
  parser.add_argument('--modes', default='decode,prefill')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--kv-cache-dtype', default='auto', choices=['auto', 'int8'],
                      help='int8: the caches\' windows quantized (decode.kv_cache_dtype)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--radius', type=int, default=128)
  parser.add_argument('--decode-tokens', type=int, default=64)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--timeout', type=float, default=600)
  parser.add_argument('--mem-cap-gb', type=float, default=16)
  harness.add_hugepages_flag(parser)
  parser.add_argument('--out', default='')
  # Internal: run a single point in this process.
  parser.add_argument('--point', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--kind', help=argparse.SUPPRESS)
  parser.add_argument('--length', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--mode', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.point:
    return run_one(args)

  passthrough = [f'--dtype={args.dtype}', f'--kv-cache-dtype={args.kv_cache_dtype}',
                 f'--batch={args.batch}', f'--layers={args.layers}',
                 f'--heads={args.heads}', f'--head-dim={args.head_dim}',
                 f'--radius={args.radius}', f'--decode-tokens={args.decode_tokens}',
                 f'--steps={args.steps}']
  print(f'# {harness.machine_description()}', flush=True)
  series = [dict(mode=mode, kind=kind) for mode in args.modes.split(',')
            for kind in args.kinds.split(',')]
  results = harness.sweep(os.path.abspath(__file__), series,
                          [int(x) for x in args.lengths.split(',')], passthrough,
                          timeout=args.timeout, mem_cap_gb=args.mem_cap_gb,
                          hugepages=args.hugepages == 'on',
                          show=('median_s', 'tokens_per_s', 'prompt_tokens_per_s', 'cache_bytes',
                                'peak_rss_gb'))
  harness.save(args.out, results)
  print(report(results))


def report(results) -> str:
  """Markdown: decode tokens/s and cache memory, and prefill time, per kind and prompt length."""
  decode = harness.length_table(
      [r for r in results if r['mode'] == 'decode'], 'kind',
      lambda r: f"{r['tokens_per_s']:.0f} tok/s / {r['cache_bytes'] / 2**20:.2f} MiB",
      'prompt ')
  prefill = harness.length_table(
      [r for r in results if r['mode'] == 'prefill'], 'kind',
      lambda r: f"{r['median_s']:.2f} s", 'prompt ')
  return ('\ndecode: generated tokens/s (batch 1) / cache memory\n\n' + decode +
          '\n\nprefill: forward over the prompt\n\n' + prefill)


if __name__ == '__main__':
  main()
