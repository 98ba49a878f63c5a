"""Tiny models and token helpers shared by the decoding tests."""
import jax
import numpy as np
from flax import nnx

from longjax import models
from longjax.models import testing

ATTENTION = testing.TINY_ATTENTION
tiny = testing.tiny_model_config  # a 2-layer fp32 model, 4 heads over 2 kv heads


def build(config, seed=0):
  return models.build(config, rngs=nnx.Rngs(seed))


def split(model):
  return nnx.split(model, nnx.Param)


def tokens(seed, shape, low=3, high=50):
  """Random non-special ids (pad 0, eos 1 and bos 2 excluded)."""
  return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.int32)


def forward(model):
  """The model's own (teacher-forced) forward, jitted: ids -> logits."""
  if model.config.arch == 'lm':
    return jax.jit(lambda ids: model(ids)[0])
  return jax.jit(lambda src, seg, tgt: model(src, tgt, inputs_segment_ids=seg)[0])
