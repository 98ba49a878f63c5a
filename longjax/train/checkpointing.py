"""Checkpoints and preemption: the one module that talks to Orbax.

Layout: one Orbax `CheckpointManager` in `<workdir>/checkpoints`, a directory
per step with two items,
  state/   the TrainState (step, params, opt_state), written by every process
           for its own shards (OCDBT);
  data/    the grain iterator position, one JSON file per process,
and the number of processes that wrote it in the step's custom metadata.

Guarantees and how they are met:
  - Saves are asynchronous: `save` returns once the arrays are copied to host
    memory; the files are written in the background while training goes on.
  - A step directory appears only when complete: Orbax writes into a temporary
    directory and renames it when every item is committed (on object stores,
    which cannot rename, it marks completion with commit_success.txt). A
    process killed mid-save leaves only that temporary directory, which the
    next start removes (`cleanup_tmp_directories`); older steps are untouched.
  - Old steps are deleted (keeping the latest `keep`) only after a new one
    is committed, so a failed save never costs an existing checkpoint.
  - `restore` tries the latest step first; if it cannot be read it says so
    and tries the one before. Steps that failed are moved, not deleted, to
    `<workdir>/checkpoints_corrupt/` (so the step numbers can be saved again)
    once an older step restored. A checkpoint that reads fine but does not
    match the config (another model size, say) is an error, never "corrupt".
  - Restoring takes abstract targets that carry the *current* shardings, so a
    checkpoint written on one mesh restores onto any other (8 devices -> 1).

Preemption: `PreemptionWatcher.reached(step)` turns SIGTERM into a checkpoint
at a step boundary (see its docstring).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

STATE = 'state'
DATA = 'data'


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not match what the config builds."""


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs by step."""

  def __init__(self, directory, *, keep: int, async_save: bool = True, read_only: bool = False):
    """read_only: restore only; touch nothing (another run may be saving here)."""
    self.directory = epath.Path(directory)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else ocp.checkpoint_managers.LatestN(n=keep),
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only)
    # Handlers given up front, so that a step's metadata can be read before
    # anything was saved or restored by this manager.
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE, DATA), options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator=None) -> bool:
    """Starts saving `state` (and the iterator position) as `step`; False if it exists."""
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                              custom_metadata={'process_count': jax.process_count()})

  def restore(self, abstract_state, data_iterator=None) -> Optional[tuple[int, Any]]:
    """(step, state) of the latest readable checkpoint, or None if there is none.

    abstract_state: a TrainState of jax.ShapeDtypeStruct with the shardings to
      restore onto. data_iterator: restored in place (its position) when given
      and the checkpoint was written by as many processes as there are now.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        self._check_matches(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self._data_restorable(step):
          items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except CheckpointMismatchError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        # Anything can fail to read a damaged checkpoint (tensorstore, JSON,
        # missing files); the remedy is the same: use the previous one.
        logging.warning('Checkpoint at step %d in %s could not be restored, trying the '
                        'previous one. The error was: %s: %s', step, self.directory,
                        type(error).__name__, error)
        failed.append(step)
        continue
      self._set_aside(failed)
      logging.info('Restored the checkpoint at step %d from %s.', step, self.directory)
      return step, restored[STATE]
    if failed:
      raise RuntimeError(
          f'No checkpoint in {self.directory} could be restored (steps {failed}, see the '
          f'warnings above). Move them away to start from scratch in this workdir.')
    return None

  def _check_matches(self, step: int, abstract_state):
    saved = self._manager.metadata(step).item_metadata[STATE]
    saved = _shapes_by_path(saved.tree if hasattr(saved, 'tree') else saved)
    if not saved:
      raise FileNotFoundError(f'step {step} has no readable array metadata')  # Damaged.
    wanted = _shapes_by_path(abstract_state)
    if saved != wanted:
      missing = sorted(set(wanted) - set(saved))[:5]
      extra = sorted(set(saved) - set(wanted))[:5]
      changed = sorted(p for p in set(saved) & set(wanted) if saved[p] != wanted[p])[:5]
      details = '; '.join(
          f'{what}: ' + ', '.join(f'{p} {shapes.get(p, "")}' for p in paths)
          for what, paths, shapes in (('not in the checkpoint', missing, wanted),
                                      ('only in the checkpoint', extra, saved),
                                      ('different shape or dtype (saved)', changed, saved))
          if paths)
      raise CheckpointMismatchError(
          f'The checkpoint at step {step} in {self.directory} does not match the model and '
          f'optimizer this config builds ({details}). Use a new workdir, or the config it '
          f'was trained with ({self.directory.parent / "config.json"}).')

  def _data_restorable(self, step: int) -> bool:
    saved = (self._manager.metadata(step).custom_metadata or {}).get('process_count')
    if saved is not None and saved != jax.process_count():
      logging.warning('The data position at step %d was saved by %d processes and this run '
                      'has %d: the training data stream starts again from its beginning.',
                      step, saved, jax.process_count())
      return False
    return True

  def _set_aside(self, steps):
    """Moves unreadable steps out of the manager's directory (never deletes them)."""
    if not steps or self.read_only:
      return
    if jax.process_index() == 0:
      corrupt_dir = self.directory.parent / 'checkpoints_corrupt'
      corrupt_dir.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = corrupt_dir / f'{step}.{int(time.time())}'
        (self.directory / str(step)).rename(target)
        logging.warning('Moved the unreadable checkpoint of step %d to %s.', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('longjax_checkpoints_set_aside')
    self._manager.reload()

  def wait(self):
    """Blocks until the saves in flight are written."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the saves in flight, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _path_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _shapes_by_path(tree) -> dict[str, tuple]:
  """{'params/decoder/blocks/0/...': (shape, dtype)}: a layout-free view of a state.

  Orbax writes named tuples as lists and integer keys as strings; naming
  every path element by its string makes a saved tree and a target comparable.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_path_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in leaves}


class PreemptionWatcher:
  """Says when to save and stop because a preemption notice (SIGTERM) arrived.

  Multi-process runs (jax.distributed initialised): JAX's preemption service
  catches SIGTERM on any process and agrees on one step at which all
  processes save (`multihost_utils.reached_preemption_sync_point`). A single
  process catches SIGTERM itself; the step in flight completes first.
  Training then saves, and exits with status 143 (128 + SIGTERM), so a
  scheduler sees a terminated job, not a finished one.
  """

  def __init__(self):
    self._distributed = jax.distributed.is_initialized()
    self._received = threading.Event()
    self._previous_handler = None
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._received.set()

  def reached(self, step: int) -> bool:
    if self._distributed:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off.
        return False
    return self._received.is_set()

  def close(self):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


EXIT_PREEMPTED = 128 + signal.SIGTERM
