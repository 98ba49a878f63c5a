"""One trainer per workdir: an exclusive lock held for the whole run.

Two trainers on one workdir interleaved their metrics, broke checkpoint
retention and crashed in each other's cleanup (reliability audit, M5). The
chief takes `fcntl.flock` on `<workdir>/trainer.lock` (the other processes of
a multi-host run share the chief's); the kernel releases it when the process
ends, however it ends (SIGKILL too), so a lock never outlives its holder. The
file records the holder's host, PID and start time, for the refusal message
and to report when a dead holder's record is taken over.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

LOCK_FILE = 'trainer.lock'


class WorkdirBusyError(RuntimeError):
  """Another trainer holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _holder(fd) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode('utf-8', 'replace')
  try:
    return json.loads(text) if text.strip() else {}
  except json.JSONDecodeError:
    return {}


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True):
  """Holds the workdir's lock for the `with` block; raises WorkdirBusyError at once
  (naming the holder's host and PID) when another trainer holds it."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise
      holder = _holder(fd)
      raise WorkdirBusyError(
          f'--workdir={workdir} is in use by another trainer (host '
          f'{holder.get("host", "?")}, pid {holder.get("pid", "?")}, since '
          f'{holder.get("since", "?")}): two trainers on one workdir would mix their '
          f'checkpoints and metrics. Wait for it to finish or stop it, or use another '
          f'--workdir.') from None
    previous = _holder(fd)
    host = socket.gethostname()
    if previous.get('pid') and previous.get('host') == host and not _alive(previous['pid']):
      logging.warning('The previous trainer of %s (pid %s, since %s) ended without releasing '
                      'its lock record; taking it over.', workdir, previous['pid'],
                      previous.get('since'))
    record = dict(host=host, pid=os.getpid(),
                  since=datetime.datetime.now().isoformat(timespec='seconds'))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
