"""The multi-process coordinator listens on the address it is given when that is loopback
(JAX's default is every interface, `[::]:PORT`)."""
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from longjax import cli
from tests.train import train_testing


@pytest.mark.parametrize('given, bind', [
    ('localhost:1234', 'localhost:1234'),
    ('LOCALHOST:1234', 'LOCALHOST:1234'),
    ('127.0.0.1:1234', '127.0.0.1:1234'),
    ('127.1.2.3:80', '127.1.2.3:80'),
    ('[::1]:1234', '[::1]:1234'),
    # Another host: JAX's default (every interface), since process 0 may know itself by
    # another address than the one the other hosts use.
    ('10.0.0.5:1234', None),
    ('host0:1234', None),
    ('[2001:db8::1]:1234', None),
    # Nothing given (found from the cluster), or not host:port (JAX says what is wrong).
    (None, None),
    ('', None),
    ('localhost', None),
])
def test_a_loopback_coordinator_binds_to_that_address_only(given, bind):
  assert cli.coordinator_bind_address(given, environ={}) == bind


def test_jax_coordinator_bind_address_in_the_environment_is_left_to_jax():
  environ = {'JAX_COORDINATOR_BIND_ADDRESS': '0.0.0.0:1234'}
  assert cli.coordinator_bind_address('localhost:1234', environ=environ) is None


def _initialize_arguments(tmp_path, *flags, **environ):
  env = dict(train_testing.subprocess_env(), LONGJAX_HUGEPAGES='0', **environ)
  result = train_testing.run_python(
      [os.path.join(train_testing.REPO_ROOT, 'tests', 'main_with_fake_distributed.py'),
       '--config=configs/tiny.py', f'--workdir={tmp_path}', *flags], env=env, timeout=240)
  lines = [line for line in result.stdout.splitlines() if line.startswith('INITIALIZE ')]
  assert len(lines) == 1, result.stdout + result.stderr[-3000:]
  return json.loads(lines[0][len('INITIALIZE '):])


@pytest.mark.slow  # A subprocess.
def test_main_passes_the_loopback_bind_address_to_jax(tmp_path):
  given = _initialize_arguments(tmp_path, '--coordinator_address=localhost:4321',
                                '--num_processes=2', '--process_id=0')
  assert given['coordinator_bind_address'] == 'localhost:4321'
  assert given['coordinator_address'] == 'localhost:4321'
  # From the environment variable JAX also reads.
  given = _initialize_arguments(tmp_path, '--num_processes=2', '--process_id=0',
                                JAX_COORDINATOR_ADDRESS='127.0.0.1:4322')
  assert given['coordinator_bind_address'] == '127.0.0.1:4322'
  # Another host: JAX's default.
  given = _initialize_arguments(tmp_path, '--coordinator_address=host0:4323',
                                '--num_processes=2', '--process_id=0')
  assert given['coordinator_bind_address'] is None


def _address(hex_address):
  """A /proc/net/tcp or tcp6 address: 32-bit words in hex, each little-endian (x86, arm)."""
  words = [bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8)]
  return ipaddress.ip_address(b''.join(words))


def _is_loopback(address):
  mapped = getattr(address, 'ipv4_mapped', None)  # ::ffff:127.0.0.1, IPv4 on an IPv6 socket.
  return address.is_loopback or bool(mapped and mapped.is_loopback)


def _listening(port):
  """The local addresses of the TCP sockets listening on port (Linux /proc/net/tcp*)."""
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    if not os.path.exists(table):
      continue
    with open(table, encoding='ascii') as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        address, state = fields[1], fields[3]
        host, port_hex = address.rsplit(':', 1)
        if state == '0A' and int(port_hex, 16) == port:  # 0A: LISTEN.
          found.append(_address(host))
  return found


def test_proc_net_addresses_are_read_as_the_kernel_writes_them():
  assert _address('0100007F') == ipaddress.ip_address('127.0.0.1')
  assert _address('00000000') == ipaddress.ip_address('0.0.0.0')
  assert _address('00000000000000000000000001000000') == ipaddress.ip_address('::1')
  assert _address('0000000000000000FFFF00000100007F') == ipaddress.ip_address('::ffff:127.0.0.1')
  assert _is_loopback(_address('0000000000000000FFFF00000100007F'))
  assert not _is_loopback(_address('00000000000000000000000000000000'))  # [::], every interface.


@pytest.mark.slow  # A subprocess that starts a real (one-process) coordinator.
@pytest.mark.skipif(not os.path.exists('/proc/net/tcp') or sys.byteorder != 'little',
                    reason='reads Linux /proc/net/tcp as a little-endian machine writes it')
def test_a_localhost_coordinator_does_not_listen_on_other_interfaces(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(train_testing.subprocess_env(), LONGJAX_HUGEPAGES='0')
  process = subprocess.Popen(
      [sys.executable, '-m', 'longjax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
       f'--coordinator_address=localhost:{port}', '--num_processes=1', '--process_id=0',
       '--config.num_train_steps=1000'],
      cwd=train_testing.REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.monotonic() + 180
    hosts = []
    while not hosts and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
      hosts = _listening(port)
    assert hosts, f'nothing listened on {port}: {process.poll()}'
    time.sleep(1.0)  # Every address the coordinator binds (IPv4 and IPv6) is open by now.
    hosts = _listening(port)
  finally:
    process.kill()
    _, stderr = process.communicate(timeout=60)
  assert hosts and all(map(_is_loopback, hosts)), ([str(host) for host in hosts],
                                                   stderr[-3000:])
