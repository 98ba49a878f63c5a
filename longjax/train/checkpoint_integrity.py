"""What is on disk is what was saved: array checksums and durable commits.

`array_digests` checksums every array of a saved state (recorded with the step,
checked by `verify_digests` on restore: a flipped bit is corruption, and the
checkpointer falls back to the previous step); `DurableRenameTemporaryPath`
fsyncs a step's files and directories before Orbax's commit rename, so a
finished save survives power loss. Used by `longjax/train/checkpointing.py`.
"""
from __future__ import annotations

import asyncio
import errno
import os
import time
from typing import Optional

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
# Private modules of the pinned orbax-checkpoint==0.12.8 (see DurableRenameTemporaryPath).
from orbax.checkpoint._src.metadata import checkpoint as checkpoint_metadata
from orbax.checkpoint._src.path import async_path

# The checksum scheme `array_digests` computes; recorded with every step.
DIGEST_FORMAT = 'longjax-array-digest-v1'


class CheckpointCorruptError(ValueError):
  """A checkpoint that reads, but whose arrays differ from what was saved."""


def path_name(key) -> str:
  """A tree path element as a string (dict key, attribute name or sequence index)."""
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


# Checksums of array contents ------------------------------------------------------------
#
# A digest is two 32-bit sums over the array's elements, each element's bits
# first mixed with its flat index (the murmur3 finaliser). Integer sums are
# exact in any order, so the digest is the same on any mesh and device count;
# computing it on the devices where the arrays live covers every process's
# shards and needs no copy to the host. Any one changed element changes each
# sum (a single flipped bit always does); reordered elements do too.

_GOLDEN = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_words(x) -> Optional[jax.Array]:
  """x's bits as uint32 (one word per element; two for 8-byte types), or None."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  if size == 8 and not jnp.issubdtype(x.dtype, jnp.complexfloating):
    return lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  return None  # Sub-byte or complex types: not checksummed.


def _leaf_digest(x):
  words = _as_words(x)
  if words is None:
    return None
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):  # The flat index, modulo 2**32.
    index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride)
    stride = (stride * words.shape[axis]) % 2**32
  return tuple(jnp.sum(_fmix32(words ^ _fmix32(index * np.uint32(golden) + np.uint32(seed))),
                       dtype=jnp.uint32)
               for seed, golden in enumerate(_GOLDEN, start=1))


@jax.jit
def _digests_on_device(leaves):
  return [_leaf_digest(x) for x in leaves]


def array_digests(tree) -> dict[str, str]:
  """{'params/.../kernel': '1f2e3d4c5b6a7988'}: a checksum of every array's values."""
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_digests_on_device([leaf for _, leaf in paths_and_leaves]))
  return {'/'.join(path_name(k) for k in path): '%08x%08x' % (int(pair[0]), int(pair[1]))
          for (path, _), pair in zip(paths_and_leaves, sums) if pair is not None}


def verify_digests(step: int, saved, state):
  """Raises CheckpointCorruptError naming the arrays that differ from what was saved."""
  if not isinstance(saved, dict) or saved.get('format') != DIGEST_FORMAT:
    raise CheckpointCorruptError(f'unreadable checksums in step {step} ({str(saved)[:100]})')
  saved, read = saved['arrays'], array_digests(state)
  differ = sorted(p for p in saved if read.get(p) != saved[p])
  if differ:
    more = f' and {len(differ) - 1} more' if len(differ) > 1 else ''
    raise CheckpointCorruptError(
        f'step {step} is corrupt: array {differ[0]}{more} read back differs from the checksum '
        f'saved with it (saved {saved[differ[0]]}, read {read.get(differ[0])})')


# Durable commits -------------------------------------------------------------------------


def _fsync(path: str, *, directory: bool):
  fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
  try:
    os.fsync(fd)
  except OSError as error:
    # Some filesystems cannot fsync a directory; the files still are.
    if not directory or error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
      raise
  finally:
    os.close(fd)


def _fsync_tree(root: str):
  """fsyncs every file, then every directory (deepest first), under and including root."""
  for parent, _, names in os.walk(root, topdown=False):
    for name in names:
      path = os.path.join(parent, name)
      if not os.path.islink(path):
        _fsync(path, directory=False)
    _fsync(parent, directory=True)


class DurableRenameTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's commit by rename, with fsyncs: the step's tree before the rename, its parent after.

  `finalize` is AtomicRenameTemporaryPath.finalize of orbax-checkpoint 0.12.8
  with the two fsyncs added (it runs once, on the primary process, when every
  process's files are written; TensorStore has fsynced the array files).
  """

  async def finalize(self):
    if self._snapshot is not None:
      return await super().finalize()
    logging.info('Renaming %s to %s', self._tmp_path, self._final_path)
    store = self._checkpoint_metadata_store
    if store:
      await asyncio.to_thread(store.wait_until_finished)
      await asyncio.to_thread(
          store.update,
          file_path=checkpoint_metadata.step_metadata_file_path(self._tmp_path),
          commit_timestamp_nsecs=time.time_ns())
      await asyncio.to_thread(store.wait_until_finished)
    await async_path.write_text(self.get() / ocp.path.atomicity.COMMIT_SUCCESS_FILE,
                                f'Checkpoint commit was successful to {self._final_path}')
    await asyncio.to_thread(_fsync_tree, os.fspath(self._tmp_path))
    await async_path.rename(self._tmp_path, self._final_path)
    await asyncio.to_thread(_fsync, os.fspath(self._final_path.parent), directory=True)
