"""transient_global is LongT5's TGlobal: the same weights in Hugging Face's
FlaxLongT5 TGlobal attention (transformers 4.57.6, the last release with Flax
models; the paper authors' reference port) and in longjax's layer give the
same outputs."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax.models import testing
from longjax.models.attention import SelfAttention
from longjax.models.transformer import Stack

longt5 = pytest.importorskip('transformers.models.longt5.modeling_flax_longt5')
from transformers import LongT5Config  # noqa: E402  (after the importorskip)

EMB, HEADS, DIM, RADIUS, BLOCK = 32, 4, 8, 3, 4


def _hf_config():
  return LongT5Config(d_model=EMB, d_kv=DIM, num_heads=HEADS, local_radius=RADIUS,
                      global_block_size=BLOCK, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.0,
                      encoder_attention_type='transient-global')


def _longjax_config():
  config = testing.tiny_model_config('transient_global', arch='encoder_decoder',
                                     positions='t5_bias')
  return dataclasses.replace(
      config, emb_dim=EMB, num_heads=HEADS, num_kv_heads=HEADS, head_dim=DIM,
      t5_num_buckets=32, t5_max_distance=128,
      attention=dataclasses.replace(config.attention, radius=RADIUS, summary_block=BLOCK))


def _longjax_layer(hf_params):
  """longjax's encoder layer and the stack's bias tables, with HF's weights."""
  config = _longjax_config()
  layer = SelfAttention(config, 'transient_global', causal=False, rngs=nnx.Rngs(0))
  stack = Stack(config, ['transient_global'], causal=False, cross=False, rngs=nnx.Rngs(1))
  p = hf_params['params']
  heads = lambda w: jnp.asarray(w).reshape(EMB, HEADS, DIM)
  # T5 folds the 1/sqrt(d) softmax scale into its initialisation (HF multiplies
  # the query by sqrt(d) to cancel flax's scale); longjax scales scores by
  # 1/sqrt(d), so its query weight is HF's times sqrt(d).
  layer.wq[...] = heads(p['q']['kernel']) * math.sqrt(DIM)
  layer.wk[...] = heads(p['k']['kernel'])
  layer.wv[...] = heads(p['v']['kernel'])
  layer.wo[...] = jnp.asarray(p['o']['kernel']).reshape(HEADS, DIM, EMB)
  layer.summary_norm.scale[...] = jnp.asarray(p['global_input_layer_norm']['weight'])
  stack.relative_bias.table[...] = jnp.asarray(p['relative_attention_bias']['embedding'])
  stack.summary_bias.table[...] = jnp.asarray(p['global_relative_attention_bias']['embedding'])
  return layer, stack


@pytest.fixture
def old_jnp_clip(monkeypatch):
  """HF's Flax LongT5 calls jnp.clip(x, a_max=...), which jax 0.10 no longer accepts."""
  clip = jnp.clip

  def compatible(x, min=None, max=None, *, a_min=None, a_max=None):
    return clip(x, a_min if min is None else min, a_max if max is None else max)

  monkeypatch.setattr(jnp, 'clip', compatible)


@pytest.mark.parametrize('length,pad', [(23, 0), (23, 6), (16, 0), (9, 4), (3, 0)])
def test_transient_global_matches_hf_longt5(length, pad, old_jnp_clip):
  """Lengths not a multiple of the block (orphans), padding, a row shorter than a block."""
  rng = np.random.default_rng(length + pad)
  x = jnp.asarray(rng.normal(size=(2, length, EMB)), jnp.float32)
  mask = np.ones((2, length), np.int32)
  if pad:
    mask[1, length - pad:] = 0
  hf = longt5.FlaxLongT5TransientGlobalAttention(_hf_config(), has_relative_attention_bias=True)
  params = hf.init(jax.random.key(0), x, attention_mask=jnp.asarray(mask))
  # HF's init gives the norm scale ones: randomise it so that it is tested.
  params = jax.tree_util.tree_map(lambda a: a, params)
  params['params']['global_input_layer_norm']['weight'] = jnp.asarray(
      rng.uniform(0.5, 1.5, size=EMB), jnp.float32)
  expected, _ = hf.apply(params, x, attention_mask=jnp.asarray(mask))

  layer, stack = _longjax_layer(params)
  biases = stack._biases()
  got, _ = layer(x, positions=jnp.broadcast_to(jnp.arange(length), (2, length)),
                 segment_ids=jnp.asarray(mask), **biases)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid],
                             atol=1e-5, rtol=1e-5)
