"""TransformerLM and EncoderDecoder: shapes, parameter count, causality,
equivalences between kinds, padding invariance, precision and remat."""
import dataclasses
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax import attention, models
from longjax.models import testing


tiny = testing.tiny_model_config


def build(config, seed=0):
  return models.build(config, rngs=nnx.Rngs(seed))


def tokens(seed, shape, vocab=50):
  return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=shape), jnp.int32)


def count_params(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def expected_param_count(c: models.ModelConfig):
  """Written from the architecture, independently of the model code."""
  e, h, hk, d, m, v = (c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim,
                       c.vocab_size)
  attention_weights = e * h * d + 2 * e * hk * d + h * d * e
  mlp = (3 if c.mlp_activation in ('swiglu', 'geglu') else 2) * e * m
  block = attention_weights + mlp + 2 * e  # q,k,v,o + MLP + 2 RMSNorm scales
  n = v * e + (0 if c.tie_embeddings else e * v) + (c.max_len * e if c.positions == 'learned' else 0)
  relative = c.t5_num_buckets * h if c.positions == 't5_bias' else 0
  spans = lambda kinds: h * sum(k == 'adaptive_span' for k in kinds)
  n += c.num_layers * block + e + relative + spans(c.layer_kinds())
  if c.arch == 'encoder_decoder':
    n += c.num_decoder_layers * (block + attention_weights + e) + e + relative
  return n


@pytest.mark.parametrize('config', [
    tiny(),
    tiny(tie_embeddings=False, positions='learned', mlp_activation='relu'),
    tiny('adaptive_span', positions='t5_bias', num_kv_heads=-1, head_dim=16),
    tiny('local', arch='encoder_decoder', num_decoder_layers=3, positions='t5_bias'),
], ids=['tied', 'untied_learned', 'adaptive_t5', 'encdec'])
def test_shapes_and_parameter_count(config):
  model = build(config)
  assert count_params(model) == expected_param_count(config)
  if config.arch == 'lm':
    logits, _ = model(tokens(0, (2, 19)))
  else:
    logits, _ = model(tokens(0, (2, 23)), tokens(1, (2, 19)))
  assert logits.shape == (2, 19, config.vocab_size) and logits.dtype == jnp.float32


def test_every_weight_has_logical_axis_names():
  for config in (tiny('adaptive_span', positions='t5_bias'),
                 tiny(arch='encoder_decoder', tie_embeddings=False, positions='learned')):
    state = nnx.state(build(config), nnx.Param)
    for path, var in jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Param)):
      names = var.get_metadata()['logical_axes']
      assert len(names) == var[...].ndim, path
      assert all(isinstance(n, str) for n in names), path


@pytest.mark.parametrize('positions', ['rope', 't5_bias', 'learned'])
@pytest.mark.parametrize('kind', attention.KINDS)
def test_lm_is_causal(kind, positions):
  model = build(tiny(kind, positions=positions, num_layers=2))
  fn = jax.jit(lambda ids: model(ids)[0])
  length = 40
  ids = tokens(2, (1, length))
  base = fn(ids)
  for t in (0, 9, 23, length - 1):
    changed = fn(ids.at[:, t:].set(tokens(t + 3, (1, length - t))))
    np.testing.assert_array_equal(changed[:, :t], base[:, :t], err_msg=f'{kind} t={t}')
    assert not np.allclose(changed[:, t:], base[:, t:])


@pytest.mark.parametrize('positions', ['rope', 't5_bias'])
@pytest.mark.parametrize('kind,settings', [
    ('local', dict(radius=64)),
    ('hierarchical', dict(level0_block=64)),
    ('global_local', dict(radius=64, num_global=3, global_projections=False)),
    ('chunked', dict(chunk_size=64)),
])
def test_long_enough_windows_equal_full_attention(kind, settings, positions):
  full = build(tiny('full', positions=positions))
  other = build(tiny(kind, positions=positions, attention=settings), seed=1)
  nnx.update(other, nnx.state(full, nnx.Param))
  ids = tokens(4, (2, 45))
  segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 25], 2, axis=0))
  for seg in (None, segments):
    want, _ = full(ids, segment_ids=seg)
    got, _ = other(ids, segment_ids=seg)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_packed_segments_do_not_see_each_other():
  model = build(tiny('local', attention=dict(radius=8)))
  ids = tokens(5, (1, 30))
  seg = jnp.asarray([[1] * 12 + [2] * 18])
  positions = jnp.asarray([list(range(12)) + list(range(18))])
  base, _ = model(ids, segment_ids=seg, positions=positions)
  changed, _ = model(ids.at[:, :12].set(tokens(6, (1, 12))), segment_ids=seg, positions=positions)
  np.testing.assert_allclose(changed[:, 12:], base[:, 12:], atol=1e-6)
  alone, _ = model(ids[:, 12:])  # the second document on its own
  np.testing.assert_allclose(base[:, 12:], alone, atol=2e-5)


@pytest.mark.parametrize('kind', ['local', 'transient_global', 'hierarchical'])
def test_encoder_decoder_ignores_source_padding_and_is_causal(kind):
  config = tiny(kind, arch='encoder_decoder', num_decoder_layers=2, positions='t5_bias',
                attention=dict(decoder_kind='local', radius=3))
  model = build(config)
  fn = jax.jit(lambda src, seg, tgt: model(src, tgt, inputs_segment_ids=seg)[0])
  real = tokens(7, (2, 21))
  target = tokens(8, (2, 17))

  def padded(pad, seed):
    src = jnp.concatenate([real, tokens(seed, (2, pad))], axis=1)  # junk in the padding
    seg = jnp.concatenate([jnp.ones((2, 21), jnp.int32), jnp.zeros((2, pad), jnp.int32)], 1)
    return src, seg

  base = fn(*padded(3, 9), target)
  np.testing.assert_allclose(fn(*padded(3, 10), target), base, atol=1e-5)
  np.testing.assert_allclose(fn(*padded(40, 11), target), base, atol=1e-5)
  for t in (0, 6, 16):
    changed = fn(*padded(3, 9), target.at[:, t:].set(tokens(12 + t, (2, 17 - t))))
    np.testing.assert_array_equal(changed[:, :t], base[:, :t])
    assert not np.allclose(changed[:, t:], base[:, t:])


def _loss_and_grads(model, ids):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params)(ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
    return nll + 1e-3 * aux.get('span_penalty', 0.0)

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('kind', ['full', 'local', 'adaptive_span', 'hierarchical'])
def test_bf16_forward_backward_close_to_fp32(kind):
  ids = tokens(13, (2, 41))
  fp32 = build(tiny(kind, positions='t5_bias'))
  bf16 = build(tiny(kind, positions='t5_bias', dtype='bfloat16'))
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  loss32, grads32 = _loss_and_grads(fp32, ids)
  loss16, grads16 = _loss_and_grads(bf16, ids)
  assert np.isfinite(loss16) and abs(float(loss16) - float(loss32)) < 0.02 * float(loss32)
  for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
    assert g16.dtype == jnp.float32  # fp32 master weights get fp32 gradients
    assert np.all(np.isfinite(g16))
    scale = float(np.abs(g32).max()) + 1e-8
    assert float(np.abs(g16 - g32).max()) < 0.1 * scale


@pytest.mark.parametrize('policy', ['attention', 'full', 'dots', 'attention_out'])
def test_remat_gives_the_same_gradients(policy):
  ids = tokens(14, (2, 33))
  for kind in ('local', 'adaptive_span'):
    plain = build(tiny(kind, positions='t5_bias', dropout_rate=0.0))
    remat = build(tiny(kind, positions='t5_bias', remat=policy))
    nnx.update(remat, nnx.state(plain, nnx.Param))
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(remat, ids)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_abstract_init_of_a_billion_parameter_model_allocates_nothing():
  config = tiny('local', num_layers=24, emb_dim=2048, num_heads=16, num_kv_heads=8,
                mlp_dim=5632, vocab_size=32000, max_len=65536, attention=dict(radius=512))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  abstract = nnx.eval_shape(lambda: build(config))
  grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  assert n == expected_param_count(config)
  assert 0.9e9 < n < 1.3e9
  assert grown_mb < 500, f'abstract init grew the process by {grown_mb:.0f} MB'  # 4.4 GB if real


def test_dropout_changes_training_outputs_only():
  model = build(tiny('local', dropout_rate=0.3))
  ids = tokens(15, (2, 20))
  a, _ = model(ids)
  b, _ = model(ids)
  np.testing.assert_array_equal(a, b)
  c, _ = model(ids, dropout_key=jax.random.key(0))
  d, _ = model(ids, dropout_key=jax.random.key(1))
  assert not np.allclose(c, a) and not np.allclose(c, d)


def test_adaptive_span_reports_penalty_and_mean_span():
  config = tiny('adaptive_span', attention=dict(max_span=20, span_init=0.25))
  _, aux = build(config)(tokens(16, (1, 12)))
  np.testing.assert_allclose(aux['mean_span'], 5.0)
  np.testing.assert_allclose(aux['span_penalty'], 10.0)  # two layers of 5 tokens


@pytest.mark.parametrize('overrides,field', [
    (dict(num_heads=4, num_kv_heads=3), 'model.num_kv_heads'),
    (dict(attention=dict(kind='local', radius=0)), 'model.attention.radius'),
    (dict(attention=dict(kind='sparse')), 'model.attention.kind'),
    (dict(attention=dict(layer_pattern=('local', 'bogus'))), 'model.attention.layer_pattern'),
    (dict(attention=dict(kind='hierarchical', level0_block=5)), 'model.attention.level0_block'),
    (dict(arch='encoder_decoder', attention=dict(decoder_kind='sparse')),
     'model.attention.decoder_kind'),
    (dict(emb_dim=30, num_heads=4), 'model.head_dim'),
    (dict(positions='alibi'), 'model.positions'),
    (dict(remat='sometimes'), 'model.remat'),
    (dict(attention=dict(kind='transient_global', implementation='cudnn')),
     'model.attention.implementation'),
    (dict(num_layer=3), 'model.num_layer'),
])
def test_invalid_configs_name_the_field(overrides, field):
  att = overrides.pop('attention', {})
  base = dict(arch='lm', num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, vocab_size=50,
              max_len=128, attention=dict(dict(kind='full'), **att))
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    models.ModelConfig.from_config(dict(base, **overrides))


def test_deprecated_spellings_still_work_with_a_warning():
  base = dict(num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, vocab_size=50, max_len=128)
  with pytest.warns(FutureWarning, match='model.arch'):
    config = models.ModelConfig.from_config(dict(base, kind='encoder_decoder'))
  assert config.arch == 'encoder_decoder'
  with pytest.warns(FutureWarning, match='summary_block'):
    config = models.ModelConfig.from_config(dict(base, attention=dict(kind='chunked',
                                                                      block_size=8)))
  a = config.attention
  assert (a.summary_block, a.level0_block, a.chunk_size) == (8, 8, 8)
  # The unset values the base config carries change nothing.
  config = models.ModelConfig.from_config(dict(base, kind='', attention=dict(block_size=-1)))
  assert config.arch == 'lm' and config.attention.chunk_size == 64


@pytest.mark.parametrize('pattern', ['local,local,full', ('local', 'local', 'full'),
                                     ('local,local,full',), ['local, local', 'full']])
def test_layer_pattern_accepts_the_comma_form(pattern):
  """The last two forms are what ml-collections makes of the README's command-line form."""
  config = tiny(num_layers=3, attention=dict(layer_pattern=pattern))
  assert config.attention.layer_pattern == ('local', 'local', 'full')


def test_sentinels_are_resolved():
  config = tiny(num_kv_heads=-1, head_dim=-1, num_decoder_layers=-1, arch='encoder_decoder')
  assert (config.num_kv_heads, config.head_dim, config.num_decoder_layers) == (4, 8, 2)
  assert config.dtype == jnp.float32 and config.param_dtype == jnp.float32


def test_too_long_input_names_max_len():
  model = build(tiny(max_len=16))
  with pytest.raises(ValueError, match=r'model\.max_len'):
    model(tokens(17, (1, 17)))


def test_layer_pattern_interleaves_kinds():
  config = tiny(num_layers=5, attention=dict(layer_pattern=('local', 'local', 'full')))
  assert config.layer_kinds() == ('local', 'local', 'full', 'local', 'local')
  model = build(config)
  assert [b.attention.kind for b in model.decoder.blocks] == list(config.layer_kinds())
  assert dataclasses.replace(config, attention=dataclasses.replace(
      config.attention, layer_pattern=())).layer_kinds() == ('full',) * 5


def test_marked_global_tokens_see_the_whole_prefix():
  """global_tokens='marked': the batch's global_mask picks the global tokens (a
  question); they see every earlier token, unmarked ones only their window."""
  config = tiny('global_local', num_layers=2,
                attention=dict(radius=2, num_global=4, global_tokens='marked'))
  model = build(config)
  length = 32
  marked = jnp.zeros((1, length), jnp.int32).at[:, 28:].set(1)
  fn = jax.jit(lambda ids: model(ids, global_mask=marked)[0])
  ids = tokens(18, (1, length))
  base = fn(ids)
  changed = fn(ids.at[:, 0].set(7 if int(ids[0, 0]) != 7 else 8))
  far_unmarked = np.arange(length)[(np.arange(length) > 2 * 2) & (np.arange(length) < 28)]
  np.testing.assert_array_equal(changed[:, far_unmarked], base[:, far_unmarked])
  assert not np.allclose(changed[:, 28:], base[:, 28:])  # the question reaches token 0
  for t in (5, 29):  # still causal
    later = fn(ids.at[:, t:].set(tokens(19, (1, length - t))))
    np.testing.assert_array_equal(later[:, :t], base[:, :t])
  with pytest.raises(ValueError, match="global_tokens = 'marked' needs the batch's global_mask"):
    model(ids)
