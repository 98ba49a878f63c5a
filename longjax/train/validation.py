"""Every up-front check of a training config, with the field and the fix named.

`validate_config` runs before the tokenizer, the data or anything is compiled,
so a bad config fails in a second instead of after a compile (or an hour of
training). It reports all problems at once. Unknown field names are caught
earlier still: `main.py` locks the config, and `ModelConfig.from_config`
rejects unknown `model.*` fields for notebook use.
"""
from __future__ import annotations

import math
from typing import Mapping

from longjax import models
from longjax.data import pipeline
from longjax.data import sources
from longjax.train import optimizer


def data_parallel_size(mesh_shape: Mapping[str, int]) -> int:
  """Devices that split the batch: the rules shard `batch` over data and fsdp."""
  return int(mesh_shape['data']) * int(mesh_shape['fsdp'])


def validate_config(config, *, mesh_shape: Mapping[str, int],
                    process_count: int = 1) -> models.ModelConfig:
  """Raises ValueError listing every problem; returns the validated ModelConfig.

  mesh_shape: the resolved mesh sizes {'data': .., 'fsdp': .., 'tensor': ..,
    'sequence': ..} (after -1 is filled in; `sharding.make_mesh` checks their
    product against the devices).
  """
  errors = []

  def check(condition, field, message):
    if not condition:
      errors.append(f'config.{field} = {_value(config, field)!r}: {message}')

  try:
    model_config = models.ModelConfig.from_config(config.model)
  except ValueError as error:
    model_config = None
    errors.append(f'config.{error}' if str(error).startswith('model.') else str(error))

  for field in ('batch_size', 'seq_len', 'grad_accum_steps', 'log_every_steps',
                'keep_checkpoints'):
    check(config[field] >= 1, field, 'must be >= 1.')
  for field in ('num_train_steps', 'warmup_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'profile_steps'):
    check(config[field] >= 0, field, 'must be >= 0 (0 = off for the *_every_steps).')
  check(config.num_eval_steps >= 1 or config.num_eval_steps == -1, 'num_eval_steps',
        'must be >= 1, or -1 for the whole eval split.')
  check(config.eval_seq_len >= 1 or config.eval_seq_len == -1, 'eval_seq_len',
        'must be >= 1, or -1 for seq_len.')
  check(math.isfinite(config.learning_rate) and config.learning_rate > 0, 'learning_rate',
        'must be a finite number > 0.')
  check(config.lr_schedule in optimizer.SCHEDULES, 'lr_schedule',
        f'must be one of {optimizer.SCHEDULES}.')
  check(0.0 <= config.min_lr_ratio <= 1.0, 'min_lr_ratio', 'must be in [0, 1].')
  for field in ('weight_decay', 'grad_clip', 'z_loss'):
    check(config[field] >= 0, field, 'must be >= 0.')
  for field in ('adam_b1', 'adam_b2', 'label_smoothing'):
    check(0.0 <= config[field] < 1.0, field, 'must be in [0, 1).')

  # Lengths against what the model accepts.
  max_len = config.model.max_len
  check(config.seq_len <= max_len, 'seq_len',
        f'longer than config.model.max_len = {max_len}; shorten it or raise model.max_len.')
  check(config.eval_seq_len <= max_len, 'eval_seq_len',
        f'longer than config.model.max_len = {max_len}; raise model.max_len to evaluate at '
        f'this length.')
  if pipeline.is_seq2seq(config):
    check(config.target_len <= max_len, 'target_len',
          f'longer than config.model.max_len = {max_len}.')

  # Batch against the devices and processes that split it.
  dp = data_parallel_size(mesh_shape)
  mesh_text = ' x '.join(f'{axis}={size}' for axis, size in mesh_shape.items())
  if config.batch_size >= 1 and config.grad_accum_steps >= 1:
    check(config.batch_size % process_count == 0, 'batch_size',
          f'not divisible by the number of processes ({process_count}).')
    check(config.batch_size % config.grad_accum_steps == 0, 'batch_size',
          f'not divisible by config.grad_accum_steps = {config.grad_accum_steps}.')
    micro_batch = config.batch_size // config.grad_accum_steps
    if config.batch_size % config.grad_accum_steps == 0:
      check(micro_batch % dp == 0, 'batch_size',
            f'the global batch (micro-batch {micro_batch} with config.grad_accum_steps = '
            f'{config.grad_accum_steps}) must be divisible by the data-parallel size '
            f'config.mesh.data x config.mesh.fsdp = {dp} (mesh {mesh_text}).')
  if dp % process_count:
    errors.append(
        f'config.mesh: data x fsdp = {dp} must be a multiple of the {process_count} '
        f'processes, so that each process feeds its own rows of the batch (mesh {mesh_text}).')

  # Data and model must agree on the task kind.
  try:
    pipeline.check_task_kind(config)
  except ValueError as error:
    errors.append(str(error))

  # Marked global tokens come from the data: only the synthetic tasks mark any
  # (their question). Text batches carry an all-zero global_mask, which would
  # silently turn global_local into local attention.
  if (model_config is not None and model_config.attention.global_tokens == 'marked'
      and 'global_local' in model_config.layer_kinds()
      and not sources.is_synthetic(config.dataset.name)):
    errors.append(
        f"config.model.attention.global_tokens = 'marked': dataset "
        f"{config.dataset.name!r} marks no global tokens (only the synthetic tasks mark "
        f"their question), so global_local would attend like local; use 'prefix' (positions "
        f"0..num_global-1).")

  if errors:
    raise ValueError('Invalid config:\n  ' + '\n  '.join(errors))
  return model_config


def _value(config, field):
  try:
    return config[field]
  except (KeyError, AttributeError):
    return None
