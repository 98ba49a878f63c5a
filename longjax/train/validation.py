"""Every up-front check of a training config, with the field and the fix named.

`validate_config` runs before the tokenizer, the data or anything is compiled,
so a bad config fails in a second instead of after a compile (or an hour of
training). It reports all problems at once, and returns the typed, resolved
`RunConfig` the rest of the run reads. Unknown field names are caught earlier
still: `main.py` locks the config, and `ModelConfig.from_config` rejects
unknown `model.*` fields for notebook use.
"""
from __future__ import annotations

import math
from typing import Mapping

from longjax import attention
from longjax import data
from longjax import decode
from longjax import models
from longjax import sharding
from longjax.train import optimizer
from longjax.train import run_config as run_config_lib


class ConfigError(ValueError):
  """A config the run cannot use; each of `problems` names the field, its value and the fix.

  The command line prints these as clean FATAL lines and exits 1, where any
  other exception (a bug) keeps its traceback.
  """

  def __init__(self, problems, *, heading: str = 'Invalid config:', advice: str = ''):
    self.heading, self.problems, self.advice = heading, tuple(problems), advice
    text = heading + '\n  ' + '\n  '.join(self.problems)
    super().__init__(text + (f'\n{advice}' if advice else ''))


def data_parallel_size(mesh_shape: Mapping[str, int]) -> int:
  """Devices that split the batch: the rules shard `batch` over data and fsdp."""
  return int(mesh_shape['data']) * int(mesh_shape['fsdp'])


def validate_config(config, *, mesh_shape: Mapping[str, int],
                    process_count: int = 1) -> run_config_lib.RunConfig:
  """Raises ConfigError listing every problem; returns the validated RunConfig.

  mesh_shape: the resolved mesh sizes {'data': .., 'fsdp': .., 'tensor': ..,
    'sequence': ..} (after -1 is filled in; `sharding.make_mesh` checks their
    product against the devices).
  """
  errors = []

  def check(condition, field, message):
    if not condition:
      errors.append(f'config.{field} = {_value(config, field)!r}: {message}')

  def typed(make):
    """make(), or None with its problems (each naming its field) recorded."""
    try:
      return make()
    except data.DataConfigError as error:
      problems = error.problems
    except ValueError as error:
      message = str(error)
      problems = [f'config.{message}' if message.startswith('model.') else message]
    errors.extend(problems)
    return None

  model_config = typed(lambda: models.ModelConfig.from_config(config.model))
  data_config = typed(lambda: data.DataConfig.from_config(config))
  decode_settings = typed(lambda: decode.DecodeSettings.from_config(config.decode))

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
  if data_config is not None and data_config.seq2seq:
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

  if model_config is not None and data_config is not None:
    errors.extend(_model_and_data_disagree(model_config, data_config))
  if model_config is not None:
    errors.extend(_sequence_shards_problems(config, model_config, mesh_shape))

  if errors:
    # The data layer checks some top-level fields too (seq_len, batch_size), in
    # the same words: each problem is listed once.
    raise ConfigError(dict.fromkeys(errors))
  return run_config_lib.RunConfig(
      model=model_config, data=data_config,
      optimizer=optimizer.OptimizerConfig.from_config(config),
      loop=run_config_lib.LoopConfig.from_config(config), decode=decode_settings,
      mesh_shape={axis: int(size) for axis, size in mesh_shape.items()},
      axis_rules=sharding.rules_from_config(config.axis_rules))


def _sequence_shards_problems(config, model_config: models.ModelConfig,
                              mesh_shape: Mapping[str, int]) -> list[str]:
  """With config.mesh.sequence = n > 1 every length is split into n shards, and
  each shard must hold whole kernel tiles: a tile's neighbours are then whole
  blocks of the next shard, and GSPMD moves just that halo."""
  shards = int(mesh_shape.get('sequence', 1))
  if shards <= 1:
    return []
  found = []
  lengths = {'seq_len': config.seq_len}
  if config.eval_seq_len not in (-1, config.seq_len):
    lengths['eval_seq_len'] = config.eval_seq_len
  for field, length in lengths.items():
    if length % shards:
      found.append(f'config.{field} = {length}: not divisible by config.mesh.sequence = '
                   f'{shards}, which splits it into equal shards.')
      continue
    for kind in sorted(model_config.attention_kinds()):
      spec = attention.spec(kind)
      if spec.tile is None:
        continue
      tile = spec.tile(spec.settings(model_config.attention))
      if (length // shards) % tile:
        found.append(
            f'config.{field} = {length}: each of the config.mesh.sequence = {shards} shards '
            f'holds {length // shards} tokens, not a multiple of the {kind} kernel\'s tile of '
            f'{tile} tokens; make config.{field} a multiple of {shards * tile} or change '
            f'config.mesh.sequence.')
  return found


def _model_and_data_disagree(model_config: models.ModelConfig,
                             data_config: data.DataConfig) -> list[str]:
  """The task kind, and marked global tokens, checked between the model and its data."""
  errors = []
  dataset = data_config.dataset
  if model_config.arch == 'encoder_decoder' and not data_config.seq2seq:
    errors.append(f"config.model.arch = 'encoder_decoder' needs a seq2seq dataset: set "
                  f'config.dataset.target_key (dataset {dataset.name!r}).')
  if model_config.arch == 'lm' and data_config.seq2seq:
    errors.append(f'config.dataset.target_key = {dataset.target_key!r} makes '
                  f"{dataset.name!r} seq2seq, but config.model.arch = 'lm'; set "
                  "config.model.arch = 'encoder_decoder' or clear target_key.")
  row_aligned = sorted(kind for kind in model_config.attention_kinds()
                       if not attention.spec(kind).segment_aligned)
  if (row_aligned and model_config.arch == 'lm' and not data_config.synthetic
      and dataset.pack):
    errors.append(
        f"{', '.join(row_aligned)} attention aligns its groups to the row, not to each "
        f"document, so packing would change a document's result with its offset: set "
        f"config.dataset.pack = False (or use a kind aligned to documents, e.g. hierarchical).")
  # Marked global tokens come from the data: only the synthetic tasks mark any
  # (their question). Text batches carry an all-zero global_mask, which would
  # silently turn global_local into local attention.
  if (model_config.attention.global_tokens == 'marked'
      and 'global_local' in model_config.layer_kinds() and not data_config.synthetic):
    errors.append(
        f"config.model.attention.global_tokens = 'marked': dataset "
        f"{dataset.name!r} marks no global tokens (only the synthetic tasks mark "
        f"their question), so global_local would attend like local; use 'prefix' (positions "
        f"0..num_global-1).")
  return errors


def _value(config, field):
  try:
    return config[field]
  except (KeyError, AttributeError):
    return None
