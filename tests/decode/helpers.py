"""Tiny models and token helpers shared by the decoding tests."""
import jax
import numpy as np
from flax import nnx

from longjax import models

# Small enough that every window wraps within a 13-token prompt: radius 4
# (a ring of 5), 2 global tokens, blocks of 4, spans up to 8.
ATTENTION = dict(radius=4, num_global=2, block_size=4, max_span=8, span_ramp=2.0,
                 span_init=0.5)


def tiny(attention_kind='full', **overrides):
  """A 2-layer fp32 model with grouped-query attention (4 heads, 2 kv heads)."""
  attention = dict(ATTENTION, kind=attention_kind, **overrides.pop('attention', {}))
  base = dict(kind='lm', num_layers=2, emb_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
              vocab_size=50, max_len=128, dtype='float32', param_dtype='float32')
  base.update(overrides)
  return models.ModelConfig.from_config(dict(base, attention=attention))


def build(config, seed=0):
  return models.build(config, rngs=nnx.Rngs(seed))


def split(model):
  return nnx.split(model, nnx.Param)


def tokens(seed, shape, low=3, high=50):
  """Random non-special ids (pad 0, eos 1 and bos 2 excluded)."""
  return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.int32)


def forward(model):
  """The model's own (teacher-forced) forward, jitted: ids -> logits."""
  if model.config.kind == 'lm':
    return jax.jit(lambda ids: model(ids)[0])
  return jax.jit(lambda src, seg, tgt: model(src, tgt, inputs_segment_ids=seg)[0])
