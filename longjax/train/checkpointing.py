"""Checkpoints: the one module that talks to Orbax.

Layout: one Orbax `CheckpointManager` in `<workdir>/checkpoints`, a directory
per step with three items,
  state/   the TrainState (step, params, opt_state), written by every process
           for its own shards (OCDBT);
  data/    the grain iterator position, one JSON file per process;
  digests/ a checksum of every array of state/ (`checkpoint_integrity.array_digests`), JSON;
and the number of processes that wrote it in the step's custom metadata.

Guarantees and how they are met:
  - Saves are asynchronous: `save` returns once the arrays are copied to host
    memory; the files are written in the background while training goes on.
  - A save that fails (disk full, no permission) stops training at once: at
    the `save` call if it fails there, else at the first `check()` (the
    trainer calls it every step), `wait()` or `close()` after the background
    write failed, as one `CheckpointSaveError` line naming the step's path,
    the bytes free on that filesystem, the cause and the steps still there.
  - A step directory appears only when complete: Orbax writes into a temporary
    directory and renames it when every item is committed (on object stores,
    which cannot rename, it marks completion with commit_success.txt). A
    process killed mid-save leaves only that temporary directory, which the
    next start removes (`cleanup_tmp_directories`); older steps are untouched.
  - A committed step survives power loss: before that rename every file and
    directory in the temporary directory is fsynced, and the parent directory
    after it (`checkpoint_integrity.DurableRenameTemporaryPath`). Orbax 0.12.8 does not do this
    itself: TensorStore fsyncs the array files it writes (its `file_io_sync`
    default), but Orbax's own JSON files (_METADATA, _CHECKPOINT_METADATA, the
    data position, the digests) and its renames (`AtomicRenameTemporaryPath.
    finalize`, `_src/path/atomicity.py`) are not synced.
  - Old steps are deleted (keeping the latest `keep`) only after a new one
    is committed, so a failed save never costs an existing checkpoint.
  - `restore` tries the latest step first; if it cannot be read, or an array
    read back does not match the checksum saved with it (a flipped bit), it
    says so and tries the one before. Steps that failed are moved, not
    deleted, to `<workdir>/checkpoints_corrupt/` (so the step numbers can be
    saved again) once an older step restored. A checkpoint that reads fine but
    does not match the config (another model size, say) is an error, never
    "corrupt". Steps saved before checksums existed restore unverified.
  - Restoring takes abstract targets that carry the *current* shardings, so a
    checkpoint written on one mesh restores onto any other (8 devices -> 1).
    The checksums are of the global arrays' values, so they hold on any mesh.

Stopping on SIGTERM / SIGINT with a save: `longjax/train/preemption.py`.
"""
from __future__ import annotations

import collections
import itertools
import logging as logging_lib
import os
import re
import shutil
import sys
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from longjax.train.checkpoint_integrity import DIGEST_FORMAT
from longjax.train.checkpoint_integrity import CheckpointCorruptError  # noqa: F401 (part of the API)
from longjax.train.checkpoint_integrity import DurableRenameTemporaryPath
from longjax.train.checkpoint_integrity import array_digests
from longjax.train.checkpoint_integrity import path_name as _path_name
from longjax.train.checkpoint_integrity import verify_digests

STATE = 'state'
DATA = 'data'
DIGESTS = 'digests'


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not match what the config builds."""


class CheckpointSaveError(RuntimeError):
  """A save that failed (disk full, no permission): training must stop."""


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs by step."""

  def __init__(self, directory, *, keep: int, async_save: bool = True, read_only: bool = False):
    """read_only: restore only; touch nothing (another run may be saving here)."""
    self.directory = epath.Path(directory)
    self.read_only = read_only
    local = '://' not in os.fspath(self.directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else ocp.checkpoint_managers.LatestN(n=keep),
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        # Object stores keep Orbax's default (a commit file, no rename).
        temporary_path_class=DurableRenameTemporaryPath if local else None)
    # Handlers given up front, so that a step's metadata can be read before
    # anything was saved or restored by this manager.
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE, DATA, DIGESTS), options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       DIGESTS: ocp.JsonCheckpointHandler()})
    self._in_flight = None  # The step whose save was started and not yet seen to finish.
    self._failed = False  # A failed save was reported; close() does not report it again.
    self._logged_since = 0  # The first of _LOGGED_IO_ERRORS that the save in flight may own.
    if not read_only:
      _quiet_orbax_io_tracebacks()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator=None) -> bool:
    """Starts saving `state` (and the iterator position) as `step`; False if it exists.

    Raises CheckpointSaveError if this save, or the one before it, failed.
    """
    self.wait()  # Orbax would wait for the previous save anyway; its failure is its own.
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state),
             DIGESTS: ocp.args.JsonSave({'format': DIGEST_FORMAT,
                                         'arrays': array_digests(state)})}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self._in_flight = step
    self._logged_since = _next_log_number()
    try:
      started = self._manager.save(
          step, args=ocp.args.Composite(**items), force=True,
          custom_metadata={'process_count': jax.process_count(), DIGESTS: DIGEST_FORMAT})
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(error) from (None if _io_cause(error) else error)
    if not started:
      self._in_flight = None
    return started

  def check(self):
    """Raises CheckpointSaveError if a save started earlier has failed; never waits for one.

    Call it once a step: a save failing in the background then stops the run
    at the next step, not at the next save.
    """
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()  # Finished: this returns at once, or raises its failure.

  def wait(self):
    """Blocks until the saves in flight are written; CheckpointSaveError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(error) from (None if _io_cause(error) else error)
    self._in_flight = None

  def _save_failed(self, error: BaseException) -> CheckpointSaveError:
    """The one-line report of a failed save, to be raised."""
    step, self._in_flight, self._failed = self._in_flight, None, True
    path = self.directory / str(step) if step is not None else self.directory
    logged = [e for number, e in list(_LOGGED_IO_ERRORS) if number >= self._logged_since]
    cause = _io_cause(error) or (logged[0] if logged else error)
    cause = _one_line(cause)
    try:
      free = f'{_human_bytes(shutil.disk_usage(self.directory).free)} free'
    except (OSError, ValueError):  # Not a local filesystem.
      free = 'free space unknown'
    kept = _committed_steps(self.directory)
    report = CheckpointSaveError(
        f'Saving the checkpoint of step {step} to {path} failed ({free} on that filesystem): '
        f'{cause}. The checkpoints already in {self.directory} are intact (steps {kept}); '
        f'training stops here. Make room (saving needs space for one checkpoint more than '
        f'keep_checkpoints) or fix the cause, then run again to resume'
        + (f' from step {kept[-1]}.' if kept else '.'))
    return report

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
        verify = self._has_digests(step)
        if verify:
          items[DIGESTS] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if verify:
          verify_digests(step, restored[DIGESTS], restored[STATE])
        else:
          logging.info('The checkpoint at step %d in %s has no array checksums (saved before '
                       'longjax recorded them): restored without verifying its contents.',
                       step, self.directory)
      except CheckpointMismatchError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        # Anything can fail to read a damaged checkpoint (tensorstore, JSON,
        # missing files, a checksum); the remedy is the same: use the previous one.
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

  def _has_digests(self, step: int) -> bool:
    """Whether the step recorded checksums (a step saved with them that lost them is damaged)."""
    recorded = (self._manager.metadata(step).custom_metadata or {}).get(DIGESTS)
    return recorded is not None or (self.directory / str(step) / DIGESTS).exists()

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
    if not (self.directory / str(step) / DATA).exists():
      logging.info('The checkpoint at step %d holds no data position (saved without a data '
                   'stream, e.g. by longjax.convert): training data starts from its beginning.',
                   step)
      return False
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

  def close(self):
    """Waits for the saves in flight, then releases the manager (also after a failed save).

    Raises CheckpointSaveError if a save failed and no earlier call reported it.
    """
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise  # A failure already reported is not reported twice.

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _shapes_by_path(tree) -> dict[str, tuple]:
  """{'params/decoder/blocks/0/...': (shape, dtype)}: a layout-free view of a state.

  Orbax writes named tuples as lists and integer keys as strings; naming
  every path element by its string makes a saved tree and a target comparable.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_path_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in leaves}


# Failed saves ----------------------------------------------------------------------------


def _io_cause(error: BaseException) -> Optional[BaseException]:
  """The I/O error (an OSError, or TensorStore's message of one) behind error, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) or any(
        mark in str(error) for mark in ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'OS error')):
      return error
    error = error.__cause__ or error.__context__
  return None


def _one_line(error: BaseException) -> str:
  """'No space left on device (errno 28); ValueError: RESOURCE_EXHAUSTED: ...' (shortened)."""
  text = ' '.join(str(error).split()).rstrip('.')
  text = text if len(text) <= 300 else text[:300] + ' ...'
  if isinstance(error, OSError) and error.strerror:
    return f'{error.strerror} (errno {error.errno}): {type(error).__name__}: {text}'
  # TensorStore: '... Failed to write 24860 bytes to file 6: No space left on device
  # [os_error_code='28']'.
  found = re.search(r"([^:\]\[]+) \[os_error_code='(\d+)'\]", str(error))
  if found:
    return f'{found.group(1).strip()} (errno {found.group(2)}): {type(error).__name__}: {text}'
  return f'{type(error).__name__}: {text}'


def _committed_steps(directory: epath.Path) -> list[int]:
  """The step directories on disk (Orbax's own list may already omit steps due for deletion)."""
  try:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  except OSError:
    return []


# The I/O errors Orbax logged (newest last): a failed save can surface as a
# consequence in another of its threads ("No ArrayMetadata found"), while the
# cause, say ENOSPC, was only logged.
_LOGGED_IO_ERRORS = collections.deque(maxlen=8)  # (number, error)
_LOG_NUMBERS = itertools.count()


class _IOErrorsWithoutTraceback(logging_lib.Filter):
  """Orbax logs a failed write's traceback from each of its threads (dozens of lines a save);
  CheckpointSaveError reports it in one line, so Orbax's records keep their first line only.
  Errors that are not I/O errors (bugs) keep their tracebacks."""

  def filter(self, record):
    if (record.exc_info and record.exc_info[1] is not None
        and f'{os.sep}orbax{os.sep}' in record.pathname and _io_cause(record.exc_info[1])):
      error = record.exc_info[1]
      _LOGGED_IO_ERRORS.append((next(_LOG_NUMBERS), _io_cause(error)))
      message = f'{record.getMessage()} ({type(error).__name__}: {" ".join(str(error).split())[:300]})'
      record.msg, record.args = '%s', (message,)
      record.exc_info, record.exc_text = None, None
    return True


def _next_log_number() -> int:
  return _LOGGED_IO_ERRORS[-1][0] + 1 if _LOGGED_IO_ERRORS else 0


def _quiet_orbax_io_tracebacks():
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _IOErrorsWithoutTraceback) for f in absl_logger.filters):
    absl_logger.addFilter(_IOErrorsWithoutTraceback())
  if not getattr(sys.unraisablehook, 'longjax_orbax_aftermath', False):
    sys.unraisablehook = _without_orbax_aftermath(sys.unraisablehook)


def _without_orbax_aftermath(previous):
  """sys.unraisablehook less the echoes of a failed save: when one write fails, Orbax
  closes that save's event loop while TensorStore's other writes still complete into it,
  each printing 'RuntimeError: Event loop is closed' (dozens), and more at interpreter
  shutdown ('sys.meta_path is None'). Nothing can act on those; the failure itself is
  reported by CheckpointSaveError. Every other unraisable exception is printed."""

  def hook(unraisable):
    error = unraisable.exc_value
    if not ((isinstance(error, RuntimeError) and str(error) == 'Event loop is closed')
            or (isinstance(error, ImportError) and 'sys.meta_path is None' in str(error))):
      previous(unraisable)

  hook.longjax_orbax_aftermath = True
  return hook


def _human_bytes(count: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if count < 1024 or unit == 'TiB':
      return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.1f} {unit}'
    count /= 1024
  raise AssertionError
