"""Stopping a run without losing it: SIGTERM and Ctrl-C mean "finish the step, save, exit".

`StopWatcher.reached(step)` says when to save and stop because a preemption
notice (SIGTERM) or an interrupt (SIGINT, Ctrl-C) arrived:

  * Multi-process runs (jax.distributed initialised): JAX's preemption service
    catches SIGTERM on any process and agrees on one step at which all
    processes save (`multihost_utils.reached_preemption_sync_point`).
  * A single process catches SIGTERM and SIGINT itself; the step in flight
    completes first. Training then saves and exits with 128 + the signal
    (143 for SIGTERM, 130 for SIGINT), so a scheduler sees a stopped job, not
    a finished one.

The handlers stay installed until every save has been written (the trainer
enters the watcher before the checkpointer, so it leaves it after the
checkpointer has waited for its saves): a second signal while saving is
logged and ignored; a third aborts at once, saying that the save in progress
is lost. Without this a second SIGTERM during the preemption save killed the
process and lost the save (reliability audit, H1).
"""
from __future__ import annotations

import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
  """The shell's status for a process stopped by `signum` (143 SIGTERM, 130 SIGINT)."""
  return 128 + int(signum)


class StopWatcher:
  """Turns SIGTERM / SIGINT into "save at the end of this step, then exit" (see module doc)."""

  def __init__(self):
    self._distributed = jax.distributed.is_initialized()
    self._first = None  # The first signal received.
    self._count = 0
    self._lock = threading.Lock()
    self._previous = {}
    if not self._distributed and threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    with self._lock:
      self._count += 1
      count = self._count
      if self._first is None:
        self._first = signum
    name = signal.Signals(signum).name
    if count == 1:
      logging.warning('%s received: finishing this step, saving a checkpoint, then exiting.',
                      name)
    elif count == 2:
      logging.warning('%s received again: ignored while the checkpoint is saved. One more '
                      'signal aborts at once and loses the save in progress.', name)
    else:
      logging.error('%s received a third time: aborting now; the checkpoint being saved is '
                    'lost (the run resumes from the previous one).', name)
      logging.flush()
      os._exit(exit_status(signum))  # pylint: disable=protected-access

  @property
  def signal_name(self) -> str:
    """The signal that stopped the run ('SIGTERM' when the preemption service did)."""
    return signal.Signals(self._first or signal.SIGTERM).name

  @property
  def exit_status(self) -> int:
    return exit_status(self._first or signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self._distributed:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off.
        return False
    return self._first is not None

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
