"""One prepared run on a GPU: correctness and speed of the GPU attention paths.

    python3 benchmarks/device_check.py --out "$OUT" --budget-s 420

Meant for a lent accelerator (the device tool: one short call), so it checks
its own time and skips what the budget does not cover, printing a short table
last. Sections, in order:
  1. correctness: each GPU implementation ('pallas_gpu', and 'cudnn' where it
     applies) against the XLA kernels at L = 4096 (bf16, 8 heads of 128, 2
     key/value heads, packed segments for pallas_gpu): max |error| and
     relative L2 error of the output and of dq, dk, dv, on random inputs;
  2. speed: forward and forward+backward TFLOP/s of each kind and
     implementation at 8k / 32k / 128k (bf16, head_dim 128, batch 1, 8 heads),
     FLOPs counted over the (query, key) pairs the mask keeps (4 d per pair
     forward; forward+backward = 3.5x forward, FlashAttention-2's count);
  3. the longest causal local length whose forward+backward fits;
  4. the LM training step's MFU (model FLOPs as benchmarks/model.py counts
     them, over a bf16 matmul measured here) with local attention at the peer
     shape (d=256, 4 heads, 4 layers, mlp 1024) and a 1B shape (d=2048, 16
     heads, 16 layers, mlp 8192, vocab 32000).
Results: `$OUT/device_check.json` and the printed table. Nothing here is a
test: numbers go to BENCHMARKS.md by hand, with the machine named.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longjax import attention  # noqa: E402

RADIUS, NUM_GLOBAL, CHUNK = 128, 16, 128
KIND_SETTINGS = dict(full={}, local=dict(radius=RADIUS), chunked=dict(chunk_size=CHUNK),
                     global_local=dict(radius=RADIUS, num_global=NUM_GLOBAL))


class Budget:
  def __init__(self, seconds):
    self.end = time.time() + seconds

  def left(self):
    return self.end - time.time()


def _inputs(seed, length, heads=8, kv_heads=2, dim=128, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (1, length, heads, dim), dtype)
  k = jax.random.normal(keys[1], (1, length, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (1, length, kv_heads, dim), dtype)
  return q, k, v


def _segments(length):
  cuts = np.sort(np.random.default_rng(length).choice(np.arange(1, length), 5, replace=False))
  return jnp.asarray(np.searchsorted(cuts, np.arange(length), side='right')[None], jnp.int32)


def _call(kind, implementation, causal, segment_ids=None):
  fn = attention.get(kind)
  return lambda q, k, v: fn(q, k, v, causal=causal, segment_ids=segment_ids,
                            implementation=implementation, **KIND_SETTINGS[kind])


def _time(fn, *args, repeats=5):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _grad(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2) * 1e-3,
                  argnums=(0, 1, 2))


def _errors(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return dict(max_abs=float(np.max(np.abs(got - want))),
              rel_l2=float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))


def correctness(budget, rows, length):
  for kind in KIND_SETTINGS:
    for implementation in ('pallas_gpu', 'cudnn'):
      if implementation not in attention.spec(kind).implementations:
        continue
      for causal in (True, False):
        if budget.left() < 60:
          return
        segments = None if implementation == 'cudnn' else _segments(length)
        q, k, v = _inputs(len(rows), length)
        row = dict(section='correctness', kind=kind, implementation=implementation,
                   causal=causal, length=length, segments=segments is not None)
        try:
          # Both bf16 paths against the XLA kernels on fp32 copies of the inputs.
          fast, xla = (_call(kind, i, causal, segments) for i in (implementation, 'xla'))
          f32 = [x.astype(jnp.float32) for x in (q, k, v)]
          want = [jax.jit(xla)(*f32)] + list(jax.jit(_grad(xla))(*f32))
          for label, fn in (('', fast), ('xla_', xla)):
            got = [jax.jit(fn)(q, k, v)] + list(jax.jit(_grad(fn))(q, k, v))
            for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
              row[label + name] = _errors(a, b)
        except Exception as e:  # pylint: disable=broad-except
          row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
        rows.append(row)
        print(json.dumps(row), flush=True)


def visible_pairs(kind, length, causal):
  """(query, key) pairs the mask keeps (unpacked rows)."""
  i = np.arange(length, dtype=np.float64)
  if kind == 'full':
    return float(np.sum(i + 1) if causal else length * length)
  if kind == 'local':
    back = np.minimum(i, RADIUS) + 1
    return float(np.sum(back if causal else back + np.minimum(length - 1 - i, RADIUS)))
  if kind == 'chunked':
    within = i % CHUNK
    return float(np.sum(within + 1 if causal else np.minimum(CHUNK, length - (i - within))))
  if kind == 'global_local':
    window = visible_pairs('local', length, causal)
    g = NUM_GLOBAL
    extra_cols = np.sum(np.clip(i - RADIUS, 0, g))  # far prefix keys
    if causal:
      return float(window + extra_cols)
    return float(window + 2 * extra_cols + 2 * g * (length - g))  # rough: rows + columns
  raise ValueError(kind)


def speed(budget, rows, lengths):
  for length in lengths:
    for kind in KIND_SETTINGS:
      for implementation in ('pallas_gpu', 'cudnn', 'xla'):
        if implementation not in attention.spec(kind).implementations:
          continue
        if implementation == 'xla' and kind == 'full' and length > 32768:
          continue  # [L, L] scores in memory
        causal = True
        if budget.left() < 45:
          return
        q, k, v = _inputs(1, length)
        pairs = visible_pairs(kind, length, causal)
        flops = 4 * pairs * q.shape[-1] * q.shape[2]
        row = dict(section='speed', kind=kind, implementation=implementation, length=length,
                   causal=causal)
        try:
          fn = _call(kind, implementation, causal)
          forward = _time(fn, q, k, v)
          both = _time(_grad(fn), q, k, v)
          row.update(forward_s=forward, backward_total_s=both,
                     forward_tflops=flops / forward / 1e12,
                     total_tflops=3.5 * flops / both / 1e12)
        except Exception as e:  # pylint: disable=broad-except
          row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
        rows.append(row)
        print(json.dumps(row), flush=True)


def longest(budget, rows):
  length = 262144
  while budget.left() > 60 and length <= 4 * 1048576:
    q, k, v = _inputs(2, length)
    row = dict(section='longest', kind='local', implementation='pallas_gpu', length=length)
    try:
      row['total_s'] = _time(_grad(_call('local', 'pallas_gpu', True)), q, k, v, repeats=2)
    except Exception as e:  # pylint: disable=broad-except
      row['error'] = f'{type(e).__name__}: {str(e)[:200]}'
    rows.append(row)
    print(json.dumps(row), flush=True)
    if 'error' in row:
      return
    length *= 2


def matmul_peak():
  n = 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  return 2 * n ** 3 / _time(lambda a, b: a @ b, a, b, repeats=10)


def mfu(budget, rows, peak, shape_names, lengths):
  from types import SimpleNamespace

  from flax import nnx

  from benchmarks import model as model_bench
  from longjax import models
  shapes = dict(peer=dict(hidden=256, heads=4, layers=4, mlp=1024),
                **{'1B': dict(hidden=2048, heads=16, layers=16, mlp=8192)})
  for name in shape_names:
    shape = shapes[name]
    for length in lengths if name == 'peer' else lengths[:1]:
      if budget.left() < 60:
        return
      args = SimpleNamespace(vocab=259 if name == 'peer' else 32000, remat='none', tile_tokens=-1,
                             **shape)
      row = dict(section='mfu', shape=name, kind='local', length=length)
      try:
        config = model_bench.model_config('local', length, 'bfloat16', args)
        model = models.build(config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        ids = jax.random.randint(jax.random.key(0), (1, length + 1), 3, args.vocab)

        def loss(params, ids):
          logits, _ = nnx.merge(graphdef, params)(ids[:, :-1])
          logp = jax.nn.log_softmax(logits.astype(jnp.float32))
          return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

        seconds = _time(jax.value_and_grad(loss), params, ids, repeats=3)
        flops = model_bench.model_flops_per_step(config, length, 1)
        row.update(step_s=seconds, tokens_per_s=length / seconds, mfu=flops / seconds / peak)
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
      rows.append(row)
      print(json.dumps(row), flush=True)


def table(rows, peak):
  lines = [f'# {jax.devices()[0].device_kind}, jax {jax.__version__}; bf16 matmul '
           f'{peak / 1e12:.0f} TFLOP/s']
  for r in rows:
    if 'error' in r:
      lines.append(f"{r['section']} {r.get('kind')} {r.get('implementation', r.get('shape'))} "
                   f"L={r.get('length')}: {r['error'][:120]}")
    elif r['section'] == 'correctness':
      err = lambda p: ' '.join(f"{n} {r[p + n]['rel_l2']:.1e}" for n in ('out', 'dq', 'dk', 'dv'))
      lines.append(f"check {r['kind']:12} {r['implementation']:10} causal={r['causal']!s:5} "
                   f"{err('')}  (xla bf16: {err('xla_')})")
    elif r['section'] == 'speed':
      lines.append(f"speed {r['kind']:12} {r['implementation']:10} L={r['length']:7} "
                   f"fwd {r['forward_s'] * 1e3:8.2f} ms {r['forward_tflops']:6.1f} TF/s  "
                   f"fwd+bwd {r['backward_total_s'] * 1e3:8.2f} ms {r['total_tflops']:6.1f} TF/s")
    elif r['section'] == 'longest':
      lines.append(f"longest local pallas_gpu L={r['length']}: fwd+bwd {r['total_s']:.2f} s")
    elif r['section'] == 'mfu':
      lines.append(f"mfu {r['shape']:5} local L={r['length']:6}: {r['tokens_per_s']:,.0f} tok/s, "
                   f"MFU {100 * r['mfu']:.1f}%")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.environ.get('OUT', '.'))
  parser.add_argument('--budget-s', type=float, default=420)
  parser.add_argument('--lengths', default='8192,32768,131072')
  parser.add_argument('--sections', default='correctness,speed,longest,mfu')
  parser.add_argument('--check-length', type=int, default=4096)
  parser.add_argument('--mfu-shapes', default='peer,1B')
  parser.add_argument('--mfu-lengths', default='8192,65536', help='the 1B shape takes the first')
  parser.add_argument('--allow-cpu', action='store_true',
                      help='a smoke test of this script on a CPU (Pallas interpreted)')
  args = parser.parse_args()
  if jax.default_backend() != 'gpu' and not args.allow_cpu:
    sys.exit(f'device_check needs a GPU; this backend is {jax.default_backend()!r}.')
  budget = Budget(args.budget_s)
  rows = []
  peak = matmul_peak()
  sections = args.sections.split(',')
  if 'correctness' in sections:
    correctness(budget, rows, args.check_length)
  if 'speed' in sections:
    speed(budget, rows, [int(x) for x in args.lengths.split(',')])
  if 'longest' in sections:
    longest(budget, rows)
  if 'mfu' in sections:
    mfu(budget, rows, peak, args.mfu_shapes.split(','),
        [int(x) for x in args.mfu_lengths.split(',')])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'device_check.json'), 'w') as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                   matmul_peak_flops=peak, rows=rows), f, indent=1)
  print(table(rows, peak))


if __name__ == '__main__':
  main()
