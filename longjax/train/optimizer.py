"""AdamW with warm-up then cosine, rsqrt or constant learning rate, and clipping.

    optimizer_config = OptimizerConfig.from_config(config)   # validate_config does this
    schedule = learning_rate_schedule(optimizer_config)
    tx = make_optimizer(optimizer_config, schedule, weight_decay_mask(abstract_params),
                        span_mask(abstract_params))

Adaptive span's parameters (`span_fraction`, a fraction of max_span per head)
are kept in [0, 1] after every update (`clamp_spans`), as the reference
implementation clamps them after each `optimizer.step()`; they are never
decayed (the reference has no weight decay).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

SCHEDULES = ('cosine', 'rsqrt', 'constant')

# Logical axis names of weights that are not decayed besides vectors (norm
# scales, spans): the T5 relative position bias is a bias table.
NO_DECAY_AXES = ('norm', 'relpos_buckets')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What the schedule and AdamW read: the config fields of the same names.

  No defaults here: longjax/configs/base.py holds them, once.
  """
  learning_rate: float  # Peak, reached at the end of warm-up.
  warmup_steps: int
  lr_schedule: str  # One of SCHEDULES.
  min_lr_ratio: float  # Cosine decays to this fraction of the peak.
  num_train_steps: int  # Where the cosine ends.
  weight_decay: float
  adam_b1: float
  adam_b2: float
  grad_clip: float  # Global norm; 0 = no clipping.

  @classmethod
  def from_config(cls, config) -> 'OptimizerConfig':
    """Reads the top-level fields of a run config; `validation` checks them first."""
    return cls(learning_rate=float(config.learning_rate), warmup_steps=int(config.warmup_steps),
               lr_schedule=str(config.lr_schedule), min_lr_ratio=float(config.min_lr_ratio),
               num_train_steps=int(config.num_train_steps),
               weight_decay=float(config.weight_decay), adam_b1=float(config.adam_b1),
               adam_b2=float(config.adam_b2), grad_clip=float(config.grad_clip))


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Peak `learning_rate` after a linear warm-up, then `lr_schedule`.

  optax calls a schedule with the number of updates already applied, so the
  n-th update (n = count + 1) uses lr(n): the first update is not wasted at
  lr 0, and warm-up ends exactly at update `warmup_steps`.
    cosine:   peak * (r + (1 - r) (1 + cos(pi t)) / 2), t from 0 at the end of
              warm-up to 1 at `num_train_steps`, r = `min_lr_ratio`;
    rsqrt:    peak * sqrt(warmup / n) after warm-up (the T5 / "Attention is all
              you need" inverse square root);
    constant: peak.
  """
  peak = config.learning_rate
  warmup = config.warmup_steps
  total = config.num_train_steps
  kind = config.lr_schedule
  min_ratio = config.min_lr_ratio

  def schedule(count):
    n = jnp.asarray(count, jnp.float32) + 1.0
    warm = jnp.minimum(1.0, n / max(warmup, 1))
    if kind == 'cosine':
      progress = jnp.clip((n - warmup) / max(total - warmup, 1), 0.0, 1.0)
      decay = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == 'rsqrt':
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(n, max(warmup, 1)))
    else:
      decay = jnp.ones_like(n)
    return peak * warm * decay

  return schedule


def weight_decay_mask(abstract_params: nnx.State) -> dict:
  """True for the weights AdamW decays: matrices, not norms, biases or spans.

  Decided from each Param's shape and logical axis names, so a new layer gets
  the right treatment without being listed here.
  """
  def decayed(variable):
    names = tuple(variable.get_metadata().get('logical_axes', ()))
    return variable.ndim >= 2 and not set(names) & set(NO_DECAY_AXES)

  mask = jax.tree.map(decayed, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(mask)


# The leaf name of adaptive span's parameters (longjax/models/attention.py).
SPAN_PARAM = 'span_fraction'


def _leaf_mask(abstract_params, selected) -> Optional[dict]:
  """True for the leaves whose name `selected(name)` picks; None when it picks none."""
  params = (nnx.to_pure_dict(abstract_params) if isinstance(abstract_params, nnx.State)
            else abstract_params)

  def pick(path, _):
    last = path[-1] if path else None
    return bool(selected(getattr(last, 'key', getattr(last, 'name', None))))

  mask = jax.tree_util.tree_map_with_path(pick, params)
  return mask if any(jax.tree.leaves(mask)) else None


def span_mask(abstract_params) -> Optional[dict]:
  """True for adaptive span's `span_fraction` leaves; None when the model has none."""
  return _leaf_mask(abstract_params, lambda name: name == SPAN_PARAM)


def clamp_spans(inner: optax.GradientTransformation, mask, low: float = 0.0,
                high: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """`inner`, then the update of every leaf of `mask` moved so that param + update
  lands in [low, high] (facebookresearch/adaptive-span's `clamp_param()` after
  `optimizer.step()`); other leaves' updates are untouched.

  The state is `inner`'s own, so the optimizer state (and every checkpoint)
  has the same layout with or without the clamp. An update that stays inside
  [low, high] is passed on bit for bit; one that would overshoot becomes
  clip(param + update) - param, and param + that is exactly the bound.
  """
  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('clamp_spans needs the parameters: call tx.update(grads, state, params).')
    updates, state = inner.update(updates, state, params, **extra_args)

    def clamp(is_span, u, p):
      if not is_span:
        return u
      target = p + u
      inside = (target >= low) & (target <= high)
      return jnp.where(inside, u, jnp.clip(target, low, high) - p).astype(u.dtype)

    return jax.tree.map(clamp, mask, updates, params), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(config: OptimizerConfig, schedule: optax.Schedule, decay_mask,
                   spans=None) -> optax.GradientTransformation:
  """Global-norm clipping (`grad_clip`, 0 = off), then AdamW; then, given a
  `span_mask` (adaptive span), the span parameters kept in [0, 1]."""
  tx = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=1e-8,
                   weight_decay=config.weight_decay, mask=decay_mask)
  # Always a chain, with identity for no clipping: neither holds state, so a
  # resume may turn clipping on or off (a schedule change) and the optimizer
  # state keeps its layout.
  clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
  tx = optax.chain(clip, tx)
  if spans is not None:
    tx = clamp_spans(tx, spans)
  return tx


def adapter_mask(abstract_params) -> Optional[dict]:
  """True for LoRA adapters (models/peft.py); None when the model has none."""
  from longjax.models import peft  # pylint: disable=g-import-not-at-top
  return _leaf_mask(abstract_params, lambda name: peft.is_adapter([name]))


def adapters_only(inner: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """`inner` on the leaves of `mask` (the adapters), a zero update elsewhere: the
  base weights stay bitwise what they were, and the optimizer state (Adam's
  moments) exists for the adapters alone (optax.multi_transform)."""
  labels = jax.tree.map(lambda trained: 'adapter' if trained else 'frozen', mask)
  return optax.multi_transform({'adapter': inner, 'frozen': optax.set_to_zero()}, labels)

