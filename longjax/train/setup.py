"""One run set-up for every entry point: training, --mode=eval, --mode=decode, the tests.

    run = build_run(config, workdir)     # a bad config fails here, before any compile
    state = run.fresh_state()            # training from scratch, or
    step, state = run.restore_latest()   # evaluation: the latest checkpoint, read-only

`build_run` goes mesh (a bad mesh fails first, in a second) -> the validated
`RunConfig` -> tokenizer -> the model config with the tokenizer's vocabulary
-> graphdef and abstract parameters -> schedule and optimizer -> the layout of
every leaf of the TrainState -> the abstract state a restore fills in. It
allocates and compiles nothing. Training restores through the same
`abstract_state` (with its data iterator) or starts from `fresh_state()`, so
a checkpoint is always read against the layout this run would create.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import socket
from typing import Optional

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longjax import data
from longjax import sharding
from longjax.train import checkpointing
from longjax.train import optimizer
from longjax.train import run_identity
from longjax.train import state as state_lib
from longjax.train import steps
from longjax.train import validation
from longjax.train.run_config import RunConfig

CHECKPOINTS = 'checkpoints'


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's validated settings, tokenizer, model graph, optimizer and state layout."""
  config: RunConfig  # config.model.vocab_size is the tokenizer's.
  workdir: str  # Absolute (or a URL).
  mesh: Mesh
  tokenizer: data.Tokenizer
  graphdef: nnx.GraphDef
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  shardings: state_lib.TrainState  # NamedSharding of every leaf.
  abstract_state: state_lib.TrainState  # ShapeDtypeStructs with those shardings.

  @property
  def rules(self) -> tuple:
    return self.config.axis_rules

  @property
  def replicated(self) -> NamedSharding:
    """The layout of step metrics: every device holds them whole."""
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, CHECKPOINTS)

  def step_settings(self, *, exact_match: bool = False) -> steps.StepSettings:
    """The loss settings of the train and eval steps (bytes counted for text only)."""
    byte_lengths = None if self.config.data.synthetic else self.tokenizer.token_byte_lengths
    return steps.StepSettings.create(self.config.model, self.config.loop,
                                     seq2seq=self.config.data.seq2seq,
                                     token_byte_lengths=byte_lengths, exact_match=exact_match)

  def fresh_state(self) -> state_lib.TrainState:
    """New parameters (seeded by config.seed) and optimizer state, made in their shards."""
    return state_lib.create_train_state(self.config.model, self.tx, self.shardings,
                                        seed=self.config.loop.seed)

  def checkpointer(self, *, read_only: bool = False) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(self.checkpoint_dir,
                                      keep=self.config.loop.keep_checkpoints,
                                      read_only=read_only)

  def restore_latest(self) -> tuple[int, state_lib.TrainState]:
    """(step, state) of the latest checkpoint on this run's mesh; NotTrainedError if none."""
    # Read-only: a training run may be writing to this directory right now.
    with self.checkpointer(read_only=True) as checkpoints:
      restored = checkpoints.restore(self.abstract_state)
    if restored is None:
      raise run_identity.NotTrainedError(f'No checkpoint to evaluate in {self.checkpoint_dir}; '
                                         f'train first with the same --workdir.')
    return restored


def build_run(config, workdir, *, process_count: Optional[int] = None) -> Run:
  """Validates `config` (an ml-collections ConfigDict) and sets up a run in `workdir`.

  process_count: for the batch checks; default jax.process_count().
  Raises validation.ConfigError (a ValueError) naming every bad field, before
  anything is compiled.
  """
  workdir = absolute(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as error:  # Its messages name the config.mesh field and the fix.
    raise validation.ConfigError([str(error)]) from None
  run_config = validation.validate_config(
      config, mesh_shape=dict(mesh.shape),
      process_count=jax.process_count() if process_count is None else process_count)

  # A dataset not prepared in data_dir, or an empty split, fails here, before a
  # tokenizer is trained or anything compiles (embedded datasets are built here).
  data.check_dataset(run_config.data.dataset)
  tokenizer = data.get_tokenizer(run_config.data, workdir)
  model_config = dataclasses.replace(run_config.model, vocab_size=int(tokenizer.vocab_size))
  run_config = dataclasses.replace(run_config, model=model_config)

  graphdef, abstract_params = state_lib.abstract_model(model_config)
  schedule = optimizer.learning_rate_schedule(run_config.optimizer)
  tx = optimizer.make_optimizer(run_config.optimizer, schedule,
                                optimizer.weight_decay_mask(abstract_params),
                                optimizer.span_mask(abstract_params))
  adapters = optimizer.adapter_mask(abstract_params)
  if adapters is not None:  # LoRA: only the adapters train
    tx = optimizer.adapters_only(tx, adapters)
  shardings = state_lib.state_shardings(tx, abstract_params, mesh, run_config.axis_rules)
  abstract_state = state_lib.abstract_train_state(model_config, tx, shardings)
  return Run(config=run_config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
             graphdef=graphdef, schedule=schedule, tx=tx, shardings=shardings,
             abstract_state=abstract_state)


def absolute(workdir) -> str:
  """Orbax needs absolute paths; URLs (gs://...) are left alone."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(workdir)


def workdir_problem(workdir, *, create: bool) -> Optional[str]:
  """What stops a run from writing to `workdir`, said after its name; None if nothing.

  Checked before anything is built, so that a file in the way, a directory
  without write permission or a full disk is reported as such, not as an
  OSError from deep inside the first checkpoint. create: make it if missing
  (training); otherwise a missing workdir means nothing was trained there.
  """
  workdir = os.fspath(workdir)
  if '://' in workdir:
    return None  # A URL: its storage layer reports its own errors.
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    return 'is a file, not a directory; pass a directory (it is created if missing).'
  if not create and not os.path.isdir(path):
    return 'does not exist: nothing was trained there; train first with the same --workdir.'
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    return (f'cannot be created ({error.filename or path}: {error.strerror}); pass a '
            f'directory you can write to.')
  # Write and sync a few bytes: permissions, read-only mounts and a full disk
  # all show here. The name is unique to this process (hosts may share the workdir).
  probe = os.path.join(path, f'.longjax_write_check.{socket.gethostname()}.{os.getpid()}')
  try:
    with open(probe, 'wb') as f:
      f.write(bytes(4096))
      f.flush()
      os.fsync(f.fileno())
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    if free < 2**20:
      raise OSError(errno.ENOSPC, f'{free} bytes free')
  except OSError as error:
    if error.errno == errno.ENOSPC:
      return (f'is on a full disk ({error.strerror}); free some space or pass a directory on '
              f'another disk.')
    return f'is not writable ({error.strerror}); pass a directory you can write to.'
  finally:
    if os.path.exists(probe):
      os.remove(probe)
  return None
