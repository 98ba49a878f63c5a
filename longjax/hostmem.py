"""Host memory on transparent huge pages: glibc's `glibc.malloc.hugetlb` tunable.

Why: XLA's CPU runtime allocates each step's temporaries afresh (gigabytes at
long lengths). glibc serves blocks that large with mmap and unmaps them on
free, so every step faults all of that memory back in 4 KiB at a time. On the
project's 2-core machine that was a quarter of a CPU training step spent in
the kernel (477,000 page faults per step for the LM at 8k tokens). With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for
transparent huge pages on those blocks (madvise): 9,000 faults, and for most
kinds 16-85% more tokens/s at 1k and up to 44% at 8k; at 32k and beyond only
3-15%, since the kernel still zeroes the fresh pages (BENCHMARKS.md). Accelerator hosts gain
little but lose nothing: only the host's large allocations change.

glibc reads tunables once, at process start, so `longjax.main` re-executes
itself with the tunable set (same PID, same arguments) before importing JAX.
Set LONGJAX_HUGEPAGES=0 to keep the process as launched.

Rematerialisation on the CPU: XLA's concurrency-optimised CPU scheduler (the
default) orders a backward pass so that recomputed activations are live
together, so `model.remat` saved nothing on a CPU (2.5 GB of temporaries for
the peer-shape LM at 16k with remat 'none' and with 'full'). With
`--xla_cpu_enable_concurrency_optimized_scheduler=false` the same programs need
1.9 and 1.4 GB. `longjax.main` and the benchmarks add that flag to XLA_FLAGS
when `model.remat` is not 'none' (`use_remat_scheduler`), before JAX starts
its CPU backend, and log it; a value of the flag already in XLA_FLAGS (either
one) is kept, which is the opt-out. Accelerator programs are not affected.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
CPU_SCHEDULER_FLAG = 'xla_cpu_enable_concurrency_optimized_scheduler'
OPT_OUT = 'LONGJAX_HUGEPAGES'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_has_tunable() -> bool:
  libc, version = platform.libc_ver()
  if libc != 'glibc':
    return False
  try:
    major, minor = (int(part) for part in version.split('.')[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def _kernel_allows_thp() -> bool:
  try:
    with open(_THP_MODE) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def is_on(environ: Mapping[str, str]) -> bool:
  """Whether `environ` asks glibc for huge pages (the tunable set to a non-zero value)."""
  for tunable in environ.get('GLIBC_TUNABLES', '').split(':'):
    name, _, value = tunable.partition('=')
    if name == TUNABLE:
      return value not in ('', '0')
  return False


def environ_with_hugepages(environ: Mapping[str, str]) -> Optional[dict]:
  """`environ` plus the hugetlb tunable, or None where it is set, unsupported or refused."""
  if environ.get(OPT_OUT, '1') == '0':
    return None
  if not sys.platform.startswith('linux') or not _glibc_has_tunable() or not _kernel_allows_thp():
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:  # Set by us before the re-exec, or by the user (any value).
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, f'{TUNABLE}=1'])))


def reexec_with_hugepages() -> None:
  """Replaces this process by itself with the tunable set; returns where nothing changes."""
  environ = environ_with_hugepages(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv: the command line as launched (`python -m longjax.main ...`),
  # interpreter options included; argv[0] as the full path, since Python finds
  # its prefix (the virtualenv) from argv[0].
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)


def xla_flags_for_remat(xla_flags: str, remat: str) -> Optional[str]:
  """`xla_flags` with the CPU scheduler that lets remat free memory, or None (unchanged):
  remat is 'none', or the flag is already given (by the user: kept)."""
  if remat == 'none' or CPU_SCHEDULER_FLAG in xla_flags:
    return None
  return f'{xla_flags} --{CPU_SCHEDULER_FLAG}=false'.strip()


def use_remat_scheduler(remat: str) -> bool:
  """Sets XLA_FLAGS for `remat` (see the module docstring); True when it changed them.

  XLA reads XLA_FLAGS when JAX starts its first backend, so this must run
  before anything touches a device; afterwards it raises rather than pretend.
  """
  flags = xla_flags_for_remat(os.environ.get('XLA_FLAGS', ''), remat)
  if flags is None:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(f'use_remat_scheduler({remat!r}) after JAX started its backends: '
                       f'XLA_FLAGS is read once; call it before the first device use.')
  os.environ['XLA_FLAGS'] = flags
  return True
