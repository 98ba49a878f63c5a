"""The int8 KV cache (decode.kv_cache_dtype='int8'): what it stores, what it costs, how
close its generations stay to the model's own forward pass.

References: the quantization bound (|x - dequantized| <= scale / 2 per element,
scale = max |x| / 127 per token and head), the byte count of the arrays, and the
teacher-forced forward of the same weights in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import decode
from longjax.models import cache as kv_cache
from tests.decode import helpers
from tests.decode.test_cache import PROMPT_LENGTHS, STEPS, teacher_forced_logits


def test_quantize_is_within_half_a_step_per_element():
  x = jax.random.normal(jax.random.key(0), (3, 2, 7, 16)) * jnp.arange(1, 8)[None, None, :, None]
  values, scale = kv_cache.quantize(x)
  assert values.dtype == jnp.int8 and scale.shape == (3, 2, 7)
  np.testing.assert_allclose(np.asarray(scale), np.abs(np.asarray(x)).max(-1) / 127, rtol=1e-6)
  error = np.abs(np.asarray(kv_cache.dequantize(values, scale, jnp.float32) - x))
  assert (error <= np.asarray(scale)[..., None] / 2 + 1e-7).all()
  zero_values, zero_scale = kv_cache.quantize(jnp.zeros((1, 4)))
  assert (np.asarray(zero_values) == 0).all() and (np.asarray(zero_scale) == 1).all()


@pytest.mark.parametrize('kind', ['full', 'local', 'global_local', 'transient_global',
                                  'hierarchical'])
def test_int8_generation_stays_close_to_the_forward_pass(kind):
  model = helpers.build(helpers.tiny(kind))
  graphdef, params = helpers.split(model)
  prompt = helpers.tokens(1, (3, PROMPT_LENGTHS.max()))
  settings = decode.DecodeSettings(max_decode_len=STEPS, temperature=1.0, eos_id=None,
                                   return_logits=True, kv_cache_dtype='int8')
  out = decode.generate(graphdef, params, prompt, PROMPT_LENGTHS, settings=settings,
                        rng=jax.random.key(7))
  window = out.cache[0].window
  assert window.k.dtype == jnp.int8 and window.k_scale is not None
  want = teacher_forced_logits(model, prompt, PROMPT_LENGTHS, np.asarray(out.tokens))
  error = np.abs(np.asarray(out.logits) - want)
  # Per-token int8 keys and values move these logits (max |logit| ~ 6) by about 1e-2.
  assert 0 < error.max() < 0.005 * np.abs(want).max(), error.max()


def test_int8_cache_bytes():
  config = helpers.tiny('full')
  model = helpers.build(config)
  b, slots, hk, d = 2, 40, config.num_kv_heads, config.head_dim
  layout = model.decoder.blocks[0].attention.cache_layout(slots)
  plain = kv_cache.init(layout, b, hk, d, jnp.bfloat16)
  int8 = kv_cache.init(layout, b, hk, d, jnp.bfloat16, cache_dtype='int8')
  positions = 4 * b * slots
  assert kv_cache.nbytes(plain) == 2 * b * hk * slots * d * 2 + positions
  # int8 values and a float32 scale per token and head, for keys and values.
  assert kv_cache.nbytes(int8) == 2 * b * hk * slots * (d + 4) + positions
  with pytest.raises(ValueError, match="kv_cache_dtype='fp4' is not one of"):
    kv_cache.init(layout, b, hk, d, jnp.bfloat16, cache_dtype='fp4')
