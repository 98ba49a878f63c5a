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
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
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
