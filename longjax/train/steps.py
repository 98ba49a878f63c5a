"""The loss, the train step and the eval step: pure functions for `jax.jit`.

    settings = StepSettings.create(model_config, loop_config, seq2seq=False)
    train_step = make_train_step(graphdef, tx, schedule, settings, param_shardings)
    new_state, metrics = train_step(state, batch)      # jitted by the trainer
    sums = make_eval_step(graphdef, settings)(params, batch)

Both return metrics already reduced over the batch as *sums* (`nll_sum`,
`weight_sum`, `correct_sum`, `byte_sum`), so the host only adds numbers and
divides once per log interval. The loss is computed in fp32 from fp32 logits
whatever the compute dtype, over `model.tile_tokens` tiles of the tokens
(`token_scores`), so that no [length, vocab] array exists at once.

Gradient accumulation splits the global batch into `grad_accum_steps`
micro-batches of interleaved rows (row r goes to micro-batch r mod k), so each
device keeps its share of every micro-batch and no rows move between devices.
The gradient is that of the *summed* objective divided once by the total
target weight, which equals the unaccumulated gradient exactly in real
arithmetic.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longjax import models
from longjax.models import layers
from longjax import sharding
from longjax.train import metrics
from longjax.train import run_config
from longjax.train.state import TrainState

# fold_in tags that separate the dropout stream from other uses of the seed.
DROPOUT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step functions read (plain values, hashable); `create` makes one."""
  seq2seq: bool
  seed: int
  dropout: bool  # model.dropout_rate > 0
  grad_accum_steps: int = 1
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  span_loss_coef: float = 0.0
  token_byte_lengths: Optional[tuple[int, ...]] = None  # per token id; None: no byte count
  exact_match: bool = False  # eval: also count rows whose answer tokens are all right
  tile_tokens: int = 0  # model.tile_tokens: the LM head and loss over token tiles

  @classmethod
  def create(cls, model: models.ModelConfig, loop: run_config.LoopConfig, *, seq2seq: bool,
             token_byte_lengths=None, exact_match: bool = False) -> 'StepSettings':
    """From the typed model and loop settings; token_byte_lengths: the tokenizer's, or None."""
    return cls(
        seq2seq=seq2seq, seed=loop.seed, dropout=model.dropout_rate > 0,
        grad_accum_steps=loop.grad_accum_steps, label_smoothing=loop.label_smoothing,
        z_loss=loop.z_loss, span_loss_coef=float(model.attention.span_loss_coef),
        token_byte_lengths=None if token_byte_lengths is None else tuple(
            int(n) for n in np.asarray(token_byte_lengths)),
        exact_match=exact_match, tile_tokens=model.tile_tokens)


def forward(graphdef: nnx.GraphDef, params, batch, settings: 'StepSettings', dropout_key=None):
  """(nll, objective, correct) per target token [b, l] and the model's aux, with
  `params` on `batch`: the final hidden states, then the LM head and the loss
  over the settings' token tiles (`token_scores`)."""
  model = nnx.merge(graphdef, params)
  if settings.seq2seq:
    x, aux = model.hidden(batch['inputs'], batch['decoder_inputs'],
                          inputs_segment_ids=batch['inputs_segment_ids'],
                          decoder_segment_ids=batch['decoder_segment_ids'],
                          dropout_key=dropout_key)
  else:
    x, aux = model.hidden(batch['inputs'], segment_ids=batch['segment_ids'],
                          positions=batch['positions'], global_mask=batch.get('global_mask'),
                          dropout_key=dropout_key)
  return token_scores(model.embedder, x, batch['targets'], settings), aux


def token_scores(embedder, x, targets, settings: 'StepSettings'):
  """(nll, objective, correct) per target token of hidden states x [b, l, emb].

  The logits exist one tile of tokens at a time and are recomputed in the
  backward pass (`layers.map_tokens`), as many as settings.tile_tokens gives.
  """
  def score(tile):
    x, targets = tile
    logits = embedder.logits(x)
    nll, objective = token_losses(logits, targets, settings)
    return nll, objective, jnp.argmax(logits, axis=-1) == targets

  tiles = models.config.token_tiles(x.shape[1], settings.tile_tokens)
  return layers.map_tokens(score, (x, targets), tiles)


def token_losses(logits, targets, settings: StepSettings):
  """(nll, objective) per target token, fp32.

  objective = (1 - s) nll + s (log Z - mean logit)     label smoothing s towards uniform
            + z_loss * (log Z)^2                       (PaLM's z-loss keeps log Z near 0)
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  objective = nll
  if settings.label_smoothing:
    uniform_ce = log_z - jnp.mean(logits, axis=-1)
    objective = (1.0 - settings.label_smoothing) * nll + settings.label_smoothing * uniform_ce
  if settings.z_loss:
    objective = objective + settings.z_loss * jnp.square(log_z)
  return nll, objective


def batch_sums(correct, nll, batch, settings: StepSettings, aux=None) -> dict[str, jax.Array]:
  """Weighted sums over the batch: nats, target tokens, correct tokens, UTF-8 bytes.

  correct [b, l]: whether each target is the argmax of its logits.

  With the model's `aux`, also its `mean_span` (adaptive span) and the spans
  of each layer and head (`metrics.span_metrics`), which `metrics.add_sums`
  keeps rather than adds.
  """
  targets = batch['targets']
  weights = batch['weights'].astype(jnp.float32)
  correct = correct.astype(jnp.float32) * weights
  sums = {
      'nll_sum': jnp.sum(nll * weights),
      'weight_sum': jnp.sum(weights),
      'correct_sum': jnp.sum(correct),
      'byte_sum': jnp.zeros((), jnp.float32),
  }
  if settings.token_byte_lengths is not None:
    lengths = jnp.asarray(settings.token_byte_lengths, jnp.float32)
    sums['byte_sum'] = jnp.sum(lengths[targets] * weights)
  if settings.exact_match:
    has_answer = jnp.any(weights > 0, axis=-1)
    all_right = jnp.sum(correct, axis=-1) == jnp.sum(weights, axis=-1)
    sums['exact_sum'] = jnp.sum((all_right & has_answer).astype(jnp.float32))
    sums['row_sum'] = jnp.sum(has_answer.astype(jnp.float32))
  if aux is not None and 'mean_span' in aux:
    sums['mean_span'] = aux['mean_span'].astype(jnp.float32)
  if aux is not None and 'head_spans' in aux:
    sums.update(metrics.span_metrics(aux['head_spans']))
  return sums


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _constrain_batch(batch):
  return {key: sharding.constrain(value, ('batch', 'length')) for key, value in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, settings: StepSettings,
                    param_shardings: Any = None) -> Callable:
  """train_step(state, batch) -> (state, metrics); trace it under `sharding.axis_rules`.

  metrics: the `batch_sums` plus `grad_norm` (before clipping), `learning_rate`
  (of this update), `finite` (loss, gradients and new parameters all finite)
  and, for adaptive span, `mean_span`.
  """
  def micro_objective(params, micro_batch, dropout_key):
    (nll, objective, correct), aux = forward(graphdef, params, micro_batch, settings,
                                             dropout_key=dropout_key)
    weights = micro_batch['weights'].astype(jnp.float32)
    total = jnp.sum(objective * weights)
    if 'span_penalty' in aux:
      # The penalty is a property of the weights, not of the tokens: scaling it
      # by this micro-batch's weight makes it count exactly once after the
      # division by the total weight below.
      total = total + settings.span_loss_coef * aux['span_penalty'] * jnp.sum(weights)
    return total, batch_sums(correct, nll, micro_batch, settings, aux)

  grad_fn = jax.grad(micro_objective, has_aux=True)

  def train_step(state: TrainState, batch):
    batch = _constrain_batch(batch)
    step_key = None
    if settings.dropout:
      # A function of (seed, step) only, so a resumed run draws the same masks.
      step_key = jax.random.fold_in(
          jax.random.fold_in(jax.random.key(settings.seed), DROPOUT_STREAM), state.step)

    k = settings.grad_accum_steps
    if k == 1:
      grads, sums = grad_fn(state.params, batch, step_key)
    else:
      def interleave(x):  # [B, ...] -> [k, B/k, ...]; row r in micro-batch r mod k.
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      micro_batches = jax.tree.map(interleave, batch)

      def accumulate(carry, inputs):
        grads_sum, sums_total = carry
        micro_batch, index = inputs
        micro_batch = _constrain_batch(micro_batch)
        key = None if step_key is None else jax.random.fold_in(step_key, index)
        grads, sums = grad_fn(state.params, micro_batch, key)
        sums_total = metrics.add_sums(sums_total, sums)
        return (jax.tree.map(jnp.add, grads_sum, grads), sums_total), None

      zero_grads = jax.tree.map(jnp.zeros_like, state.params)
      _, sums_shape = jax.eval_shape(grad_fn, state.params,
                                     jax.tree.map(lambda x: x[0], micro_batches), step_key)
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
      (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                      (micro_batches, jnp.arange(k)))

    # d(sum of objective)/d params, once divided by the number of target
    # tokens, is the gradient of the mean: identical for any k.
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums['weight_sum'], 1e-8), grads)
    if param_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if param_shardings is not None:
      params = jax.lax.with_sharding_constraint(params, param_shardings)

    step_metrics = dict(sums)
    step_metrics['grad_norm'] = optax.global_norm(grads)
    step_metrics['learning_rate'] = jnp.asarray(schedule(state.step), jnp.float32)
    step_metrics['finite'] = (jnp.isfinite(sums['nll_sum']) & _all_finite(grads)
                              & _all_finite(params))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), step_metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, settings: StepSettings) -> Callable:
  """eval_step(params, batch) -> sums (no dropout); trace it under `sharding.axis_rules`."""
  def eval_step(params, batch):
    batch = _constrain_batch(batch)
    (nll, _, correct), aux = forward(graphdef, params, batch, settings)
    return batch_sums(correct, nll, batch, settings, aux)

  return eval_step
