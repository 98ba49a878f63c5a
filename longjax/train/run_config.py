"""The typed, validated settings of one run: `RunConfig` and its loop piece.

`validation.validate_config(config, mesh_shape=...)` is the only maker of a
RunConfig: it checks the ml-collections config once, names every bad field
with its fix, resolves the `-1` sentinels, and returns these frozen values.
Each layer below takes the piece it reads (the model its ModelConfig, the
data pipeline its DataConfig, the optimizer its OptimizerConfig), never the
whole ConfigDict.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from longjax import data
from longjax import decode
from longjax import models
from longjax.train import optimizer


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the training loop, its losses and its evaluations read.

  Fields are the top-level config fields of the same names, except
  `num_decode_examples` (config.decode.num_examples) and `num_eval_steps`,
  whose -1 ("the whole eval split") is None here.
  """
  num_train_steps: int
  grad_accum_steps: int
  log_every_steps: int
  eval_every_steps: int  # 0 = no evaluation during training.
  num_eval_steps: Optional[int]  # Eval batches; None = the whole eval split.
  checkpoint_every_steps: int  # 0 = only the last step (and at preemption).
  keep_checkpoints: int
  profile_steps: int  # 0 = no trace.
  label_smoothing: float
  z_loss: float
  seed: int  # Parameters, dropout and sampling; the data has its own (DataConfig.seed).
  num_decode_examples: int  # Eval examples decoded and logged at each evaluation.

  @classmethod
  def from_config(cls, config) -> 'LoopConfig':
    """Reads a run config; `validation` checks the values first."""
    num_eval_steps = int(config.num_eval_steps)
    return cls(num_train_steps=int(config.num_train_steps),
               grad_accum_steps=int(config.grad_accum_steps),
               log_every_steps=int(config.log_every_steps),
               eval_every_steps=int(config.eval_every_steps),
               num_eval_steps=None if num_eval_steps == -1 else num_eval_steps,
               checkpoint_every_steps=int(config.checkpoint_every_steps),
               keep_checkpoints=int(config.keep_checkpoints),
               profile_steps=int(config.profile_steps),
               label_smoothing=float(config.label_smoothing), z_loss=float(config.z_loss),
               seed=int(config.seed), num_decode_examples=int(config.decode.num_examples))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run reads, validated and resolved (see `validation.validate_config`)."""
  model: models.ModelConfig
  data: data.DataConfig
  optimizer: optimizer.OptimizerConfig
  loop: LoopConfig
  decode: decode.DecodeSettings
  mesh_shape: Mapping[str, int]  # {'data', 'fsdp', 'tensor', 'sequence'}: sizes, -1 resolved.
  axis_rules: tuple  # config.axis_rules, then sharding.DEFAULT_RULES.
