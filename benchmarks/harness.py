"""Shared benchmark machinery: one fresh process per point, timed and measured.

Every benchmark point (a kind at a length, say) runs in its own subprocess so
that compile caches, allocator state and peak memory of one point never leak
into the next. The parent records:
  * the point's own JSON result (times measured inside, after compile and a
    warm-up step, each step ending with block_until_ready);
  * the subprocess's peak resident memory (ru_maxrss from os.wait4, valid even
    when the point is killed);
  * TIMEOUT / OOM / ERROR when the point fails, after which longer lengths of
    the same series are skipped.
Points run with glibc's huge-page tunable, as `longjax.main` does
(longjax/hostmem.py), unless --hugepages=off.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional


def machine_description() -> str:
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
    if names:
      cpu = names[0]
  except OSError:
    pass
  mem = ''
  try:
    with open('/proc/meminfo') as f:
      kb = int(next(l for l in f if l.startswith('MemTotal')).split()[1])
    mem = f', {kb / 2**20:.0f} GiB RAM'
  except (OSError, StopIteration):
    pass
  devices = jax.devices()
  return (f'{devices[0].device_kind} x{len(devices)} ({jax.default_backend()}), '
          f'{os.cpu_count()} cores of {cpu}{mem}; jax {jax.__version__}')


def time_steps(fn: Callable, *args, steps: int = 5, min_seconds: float = 0.0) -> dict:
  """Compiles fn, runs a warm-up, then times `steps` calls; returns seconds."""
  import jax
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  temp_bytes = getattr(analysis, 'temp_size_in_bytes', None) if analysis else None
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  began = time.perf_counter()
  while len(times) < steps or time.perf_counter() - began < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return dict(median_s=statistics.median(times), min_s=min(times), steps=len(times),
              compile_s=compile_s, xla_temp_bytes=temp_bytes, xla_flops=flops)


def add_hugepages_flag(parser) -> None:
  parser.add_argument('--hugepages', choices=['on', 'off'], default='on',
                      help="run points with glibc.malloc.hugetlb=1, as longjax.main does "
                           "(off: the environment as launched)")


def run_point(argv: list[str], *, timeout: float, mem_cap_gb: Optional[float] = None,
              env: Optional[dict] = None, hugepages: bool = True) -> dict:
  """Runs `python argv...` in a fresh process; it must print one JSON line last."""
  from longjax import hostmem
  with tempfile.TemporaryFile('w+') as out:
    child_env = dict(os.environ, **(env or {}))
    if hugepages:
      child_env = hostmem.environ_with_hugepages(child_env) or child_env
    proc = subprocess.Popen([sys.executable] + argv, stdout=out, stderr=subprocess.STDOUT,
                            env=child_env)
    start = time.time()
    status = 'ok'
    rusage = None
    while True:
      pid, code, rusage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.time() - start > timeout:
        proc.kill()
        status = 'TIMEOUT'
      elif mem_cap_gb and _rss_gb(proc.pid) > mem_cap_gb:
        proc.kill()
        status = 'OOM'
      if status != 'ok':
        _, code, rusage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
    proc.returncode = code
    out.seek(0)
    text = out.read()
  peak_gb = rusage.ru_maxrss / 2**20 if rusage else None  # ru_maxrss is KiB on Linux
  result = dict(status=status, peak_rss_gb=peak_gb, wall_s=time.time() - start)
  if status == 'ok':
    lines = [l for l in text.strip().splitlines() if l.startswith('{')]
    if code != 0 or not lines:
      oom = 'RESOURCE_EXHAUSTED' in text or 'MemoryError' in text or code == -9
      result['status'] = 'OOM' if oom else 'ERROR'
      result['log_tail'] = text[-2000:]
    else:
      result.update(json.loads(lines[-1]))
  return result


def _rss_gb(pid: int) -> float:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return 0.0


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def sweep(script: str, series: list[dict], lengths: list[int], passthrough: list[str], *,
          timeout: float, mem_cap_gb: Optional[float], show: tuple[str, ...],
          hugepages: bool = True) -> list[dict]:
  """Runs `script --point --<key>=<value>... --length=L` for every series and length.

  A series is a dict of point flags (e.g. {'kind': 'local', 'mode': 'fwd'});
  once a point fails, the longer lengths of its series are marked SKIP.
  Prints one JSON line per point (the `show` fields) as it goes.
  """
  results = []
  for flags in series:
    failed = False
    for length in lengths:
      if failed:
        row = dict(status='SKIP')
      else:
        argv = [script, '--point'] + [f'--{k}={v}' for k, v in flags.items()]
        row = run_point(argv + [f'--length={length}'] + passthrough, timeout=timeout,
                        mem_cap_gb=mem_cap_gb, hugepages=hugepages)
        failed = row['status'] != 'ok'
      row.update(flags, length=length)
      results.append(row)
      print(json.dumps({k: row.get(k) for k in tuple(flags) + ('length', 'status') + show}),
            flush=True)
  return results


def save(path: str, results: list[dict], **extra) -> None:
  """The raw results with the machine and the command line, as JSON."""
  if path:
    with open(path, 'w') as f:
      json.dump(dict(machine=machine_description(), argv=sys.argv, results=results, **extra),
                f, indent=1)


def length_table(results: list[dict], row_key: str, cell: Callable[[dict], str],
                 header_prefix: str = '') -> str:
  """Markdown table: one row per value of `row_key`, one column per length."""
  lengths = sorted({r['length'] for r in results})
  rows = []
  for name in dict.fromkeys(r[row_key] for r in results):
    row = [name]
    for length in lengths:
      r = next((r for r in results if r[row_key] == name and r['length'] == length), None)
      row.append('' if r is None else (cell(r) if r['status'] == 'ok' else r['status']))
    rows.append(row)
  return markdown_table([row_key] + [f'{header_prefix}{l}' for l in lengths], rows)
