"""Checkpoint contents, failed saves and durability: `checkpointing.Checkpointer` in process.

  - a flipped byte in a saved array is corruption: the step is set aside and
    the previous one restored (audit M6: it used to restore silently);
  - a save that fails in the background (disk full) is reported by `check()`
    at the next step, with the path, the free bytes and the cause, and the
    checkpoints already there stay (audit M8: it surfaced at the next save);
  - a committed step's files and directories are fsynced before the rename
    that commits it, and the parent directory after it (Orbax 0.12.8 does not).

The end-to-end versions (`python -m longjax.main`) are at the bottom, marked slow.
"""
import errno
import glob
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import async_path

from tests.train import train_testing
from longjax.train import checkpointing


def _state(seed):
  """A small state with the dtypes a TrainState has; `big` is random, so incompressible."""
  rng = np.random.default_rng(seed)
  return {'step': jnp.asarray(seed, jnp.int32),
          'big': jnp.asarray(rng.standard_normal(16384), jnp.float32),
          'half': jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
          'mask': jnp.asarray(rng.random(5) > 0.5)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _saved(directory, steps, keep=3):
  with checkpointing.Checkpointer(directory, keep=keep) as checkpoints:
    for step in steps:
      checkpoints.save(step, _state(step))
  return {step: jax.device_get(_state(step)) for step in steps}


def _flip_middle_byte(step_dir):
  """Flips bit 0x10 of the middle byte of the largest array data file (audit M6)."""
  data_files = [p for p in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                                     recursive=True)]
  target = max(data_files, key=os.path.getsize)
  with open(target, 'r+b') as f:
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def test_a_flipped_byte_in_array_data_is_corruption_and_the_previous_step_restores(
    tmp_path, caplog):
  directory = tmp_path / 'checkpoints'
  expected = _saved(directory, [1, 2])
  _flip_middle_byte(directory / '2')

  with checkpointing.Checkpointer(directory, keep=3) as checkpoints:
    step, restored = checkpoints.restore(_abstract(_state(0)))
  assert step == 1
  train_testing.assert_trees_equal(expected[1], jax.device_get(restored))
  set_aside, = os.listdir(tmp_path / 'checkpoints_corrupt')
  assert set_aside.startswith('2.')  # Moved, not deleted.
  assert sorted(os.listdir(directory)) == ['1']
  log = caplog.text
  assert 'Checkpoint at step 2' in log and 'big' in log and 'checksum' in log


def test_the_checksum_sees_every_single_bit_and_every_dtype():
  state = _state(3)
  state['key'] = jax.random.key(0)
  state['wide'] = jnp.arange(6, dtype=jnp.uint8)
  digests = checkpointing.array_digests(state)
  assert sorted(digests) == ['big', 'half', 'key', 'mask', 'step', 'wide']
  assert digests == checkpointing.array_digests(jax.tree.map(jnp.copy, state))  # Deterministic.
  big = np.asarray(state['big']).view(np.uint32)
  for index, bit in [(0, 0), (8191, 31), (16383, 17)]:
    flipped = big.copy()
    flipped[index] ^= np.uint32(1 << bit)
    assert checkpointing.array_digests({'big': jnp.asarray(flipped.view(np.float32))}) != \
        {'big': digests['big']}
  # The same values in another order are another array.
  swapped = np.asarray(state['big']).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert checkpointing.array_digests({'big': jnp.asarray(swapped)})['big'] != digests['big']


def test_a_checkpoint_saved_without_checksums_still_restores(tmp_path, caplog):
  """Workdirs saved before checksums existed: restored, and the log says it is unverified."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger='absl')  # another test may have raised absl's level
  state = _state(5)
  with ocp.CheckpointManager(tmp_path, item_names=('state',)) as manager:
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  with checkpointing.Checkpointer(tmp_path, keep=3) as checkpoints:
    step, restored = checkpoints.restore(_abstract(state))
  assert step == 5
  train_testing.assert_trees_equal(jax.device_get(state), jax.device_get(restored))
  assert 'no array checksums' in caplog.text


def _fail_writes_into(step, monkeypatch):
  """The next write into step's temporary directory raises ENOSPC, as a full disk does."""
  write_text = async_path.write_text

  async def full_disk(path, text):
    if f'{os.sep}{step}.orbax-checkpoint-tmp' in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await write_text(path, text)

  monkeypatch.setattr(async_path, 'write_text', full_disk)


def test_a_failed_background_save_is_reported_at_the_next_check(tmp_path, monkeypatch):
  directory = tmp_path / 'checkpoints'
  expected = _saved(directory, [1, 2], keep=2)  # A third save would delete step 1.
  _fail_writes_into(3, monkeypatch)

  checkpoints = checkpointing.Checkpointer(directory, keep=2)
  assert checkpoints.save(3, _state(3))  # Started; it fails in the background.
  deadline = time.monotonic() + 60
  with pytest.raises(checkpointing.CheckpointSaveError) as raised:
    while time.monotonic() < deadline:  # The training loop: one check() a step.
      checkpoints.check()
      time.sleep(0.05)
  message = str(raised.value)
  assert '\n' not in message
  assert str(directory / '3') in message
  assert 'No space left on device' in message
  assert re.search(r'[\d.]+ [KMGT]?i?B free', message), message
  assert 'steps [1, 2]' in message  # What is still there.
  checkpoints.close()  # Reported once: closing does not raise it again.

  monkeypatch.undo()
  with checkpointing.Checkpointer(directory, keep=2) as checkpoints:
    assert checkpoints.all_steps() == [1, 2]
    step, restored = checkpoints.restore(_abstract(_state(0)))
  assert step == 2
  train_testing.assert_trees_equal(expected[2], jax.device_get(restored))


def test_a_failed_synchronous_save_is_reported_at_the_save_call(tmp_path, monkeypatch):
  directory = tmp_path / 'checkpoints'
  _saved(directory, [1])
  _fail_writes_into(2, monkeypatch)
  with checkpointing.Checkpointer(directory, keep=3, async_save=False) as checkpoints:
    with pytest.raises(checkpointing.CheckpointSaveError, match='No space left on device'):
      checkpoints.save(2, _state(2))
    assert checkpoints.all_steps() == [1]


def test_a_committed_step_is_fsynced_before_its_rename(tmp_path, monkeypatch):
  events = []
  fsync, rename = os.fsync, os.rename

  def recording_fsync(fd):
    events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
    return fsync(fd)

  def recording_rename(src, dst, *args, **kwargs):
    events.append(('rename', os.fspath(src), os.fspath(dst)))
    return rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, 'fsync', recording_fsync)
  monkeypatch.setattr(os, 'rename', recording_rename)
  directory = tmp_path / 'checkpoints'
  _saved(directory, [7])
  monkeypatch.undo()

  final, tmp = str(directory / '7'), str(directory / '7.orbax-checkpoint-tmp')
  commit = events.index(('rename', tmp, final))
  synced_before = {e[1].replace(tmp, final) for e in events[:commit] if e[0] == 'fsync'}
  files = {os.path.join(root, name) for root, _, names in os.walk(final) for name in names}
  dirs = {root for root, _, _ in os.walk(final)}
  assert files and files <= synced_before, sorted(files - synced_before)
  assert dirs <= synced_before, sorted(dirs - synced_before)
  assert ('fsync', str(directory)) in events[commit:]  # The rename itself is durable.


# End to end, through `python -m longjax.main` -------------------------------------------

RUN = dict(num_train_steps=8, checkpoint_every_steps=4, keep_checkpoints=3, log_every_steps=1,
           eval_every_steps=0)


@pytest.fixture(scope='module')
def env(compile_cache):
  return train_testing.subprocess_env(num_devices=1, cache_dir=compile_cache)


@pytest.mark.slow
def test_bit_flips_in_a_trained_checkpoint_fall_back_to_the_previous_step(tmp_path, env):
  """Audit M6: 64 flipped bytes restored silently, then NaN blamed on the learning rate."""
  workdir = tmp_path / 'run'
  train_testing.run_main(workdir, env=env, **RUN)
  _, expected = train_testing.restore_state(train_testing.tiny_config(**RUN), workdir)
  target = max(glob.glob(str(workdir / 'checkpoints' / '8' / 'state' / '**' / 'd' / '*'),
                         recursive=True), key=os.path.getsize)
  with open(target, 'r+b') as f:
    f.seek(os.path.getsize(target) // 2)
    block = f.read(64)
    f.seek(-len(block), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in block))

  result = train_testing.run_main(workdir, env=env, **RUN)
  assert 'Checkpoint at step 8' in result.stderr and 'checksum' in result.stderr
  assert 'Restored the checkpoint at step 4' in result.stderr
  set_aside, = os.listdir(workdir / 'checkpoints_corrupt')
  assert set_aside.startswith('8.')
  # Steps 5..8 trained again from step 4: the same state as before the damage.
  step, resumed = train_testing.restore_state(train_testing.tiny_config(**RUN), workdir)
  assert step == 8
  train_testing.assert_trees_equal(expected, resumed)


@pytest.mark.slow
def test_disk_full_stops_the_run_at_once_with_one_message(tmp_path, env):
  """Audit M8: ENOSPC in step 8's save surfaced at the next save, in ~960 lines."""
  workdir = tmp_path / 'run'
  result = train_testing.run_python(
      [os.path.join(train_testing.TESTS_DIR, 'fail_save.py'), '8', '--config=configs/tiny.py',
       f'--workdir={workdir}'] + train_testing.overrides_to_flags(
           **dict(RUN, num_train_steps=40, checkpoint_every_steps=4, keep_checkpoints=1)),
      env=env, check=False)
  assert result.returncode != 0
  stderr = result.stderr
  assert f'{workdir / "checkpoints" / "8"} failed' in stderr, stderr[-3000:]
  assert 'No space left on device' in stderr and ' free on that filesystem' in stderr
  assert 'Event loop is closed' not in stderr and 'sys.meta_path is None' not in stderr
  assert len(stderr.splitlines()) < 60, stderr[-5000:]
  # Reported at once: the run stopped before the next save (step 12) was due.
  assert max(r['step'] for r in train_testing.read_metrics(workdir, 'train')) < 12
  left = os.listdir(workdir / 'checkpoints')
  assert '4' in left and '8' not in left, left  # keep=1, yet step 4 is kept: 8 never committed.
