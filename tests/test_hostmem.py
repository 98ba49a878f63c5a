"""longjax.main restarts itself once with glibc's huge-page tunable (longjax/hostmem.py)."""
import json
import os
import subprocess
import sys

import pytest

from longjax import hostmem

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = hostmem.environ_with_hugepages({}) is not None  # glibc >= 2.35 and THP allowed.


def test_environ_gains_the_tunable_once():
  assert hostmem.environ_with_hugepages({'A': '1'}) == (
      {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'} if SUPPORTED else None)
  if SUPPORTED:
    # The user's own tunables are kept, and a second pass changes nothing (no exec loop).
    env = hostmem.environ_with_hugepages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
    assert hostmem.environ_with_hugepages(env) is None
  # A value the user chose, and the opt-out, are respected.
  assert hostmem.environ_with_hugepages({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}) is None
  assert not hostmem.is_on({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert hostmem.is_on({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2'})
  assert not hostmem.is_on({})
  assert hostmem.environ_with_hugepages({'LONGJAX_HUGEPAGES': '0'}) is None


def test_unsupported_hosts_are_left_alone(monkeypatch, tmp_path):
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('glibc', '2.31'))
  assert hostmem.environ_with_hugepages({}) is None
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('', ''))  # musl, macOS
  assert hostmem.environ_with_hugepages({}) is None
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('glibc', '2.36'))
  thp = tmp_path / 'enabled'
  thp.write_text('always madvise [never]\n')
  monkeypatch.setattr(hostmem, '_THP_MODE', str(thp))
  assert hostmem.environ_with_hugepages({}) is None
  thp.write_text('always [madvise] never\n')
  assert (hostmem.environ_with_hugepages({}) is not None) == sys.platform.startswith('linux')


# After reexec_with_hugepages: the interpreter, the arguments, the tunable,
# and the minor page faults of filling a fresh 256 MiB block (65,536 faults on 4 KiB pages).
_CHILD = """
import ctypes, json, os, resource, sys
from longjax import hostmem
hostmem.reexec_with_hugepages()
libc = ctypes.CDLL(None)  # malloc itself: numpy would madvise huge pages on its own
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(2**28)
ctypes.memset(block, 1, 2**28)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(exe=sys.executable, argv=sys.argv[1:], faults=faults,
                      tunables=os.environ.get('GLIBC_TUNABLES', ''))))
"""


def _child(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES',
                                                              hostmem.OPT_OUT)}
  environ['PYTHONPATH'] = REPO_ROOT
  result = subprocess.run([sys.executable, '-c', _CHILD, 'an', 'argument'],
                          env=dict(environ, **env), capture_output=True, text=True, check=True,
                          timeout=120)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # A subprocess.
def test_reexec_keeps_the_command_and_takes_effect():
  on, off = _child(), _child(LONGJAX_HUGEPAGES='0')
  assert on['argv'] == off['argv'] == ['an', 'argument']
  assert on['exe'] == sys.executable  # the same interpreter, so the same virtualenv
  assert off['tunables'] == ''
  if SUPPORTED:
    assert on['tunables'] == 'glibc.malloc.hugetlb=1'
    # Huge pages: a fault per 2 MiB instead of per 4 KiB (some 4 KiB ones where
    # the kernel has no free huge page at hand).
    assert off['faults'] >= 60_000
    assert on['faults'] < off['faults'] / 8, (on, off)
  else:
    assert on['tunables'] == ''
