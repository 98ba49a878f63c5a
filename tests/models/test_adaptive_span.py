"""Adaptive span as Sukhbaatar et al. 2019 (facebookresearch/adaptive-span):
the soft mask and its renormalisation, and the span parameter clamped after
each optimizer update (never in the forward pass), so a head at a boundary
keeps its gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from longjax import attention, models
from longjax.models import testing
from longjax.train import optimizer as optimizer_lib


def reference_adaptive_attention(q, k, v, spans, *, max_span, ramp):
  """Causal attention masked as facebookresearch/adaptive-span's AdaptiveSpan.

  Transcribed from adaptive_span.py, with z in tokens (current_val * max_size):
      mask_template = linspace(1 - max_size, 0, max_size)
      mask = ((mask_template + z) / ramp + 1).clamp(0, 1)
      attn = softmax(scores) * mask;  attn = attn / (attn.sum(-1) + 1e-8)
  over a window of max_size keys ending at the newest key. The reference's
  window excludes the current token (its newest key is i - 1); longjax's
  includes it, and reaches max_span tokens back: its window holds
  max_size = max_span + 1 keys, the newest being the query itself.
  Independent of longjax: numpy, a loop over queries and heads.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, l, h, d = q.shape
  group = h // k.shape[2]
  max_size = max_span + 1
  template = np.linspace(1 - max_size, 0, max_size)
  out = np.zeros_like(q)
  for head in range(h):
    mask = np.clip((template + float(spans[head])) / ramp + 1, 0, 1)
    kh, vh = k[:, :, head // group], v[:, :, head // group]
    for i in range(l):
      first = i - max_size + 1
      keys = np.arange(max(first, 0), i + 1)
      scores = np.einsum('bd,bkd->bk', q[:, i, head], kh[:, keys]) / np.sqrt(d)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)  # softmax over the window
      attn = probs * mask[keys - first]
      attn = attn / (attn.sum(-1, keepdims=True) + 1e-8)
      out[:, i, head] = np.einsum('bk,bkd->bd', attn, vh[:, keys])
  return out


@pytest.mark.parametrize('spans', [(0.0, 1.5, 5.0, 8.0), (3.25, 0.0, 7.5, 2.0)])
def test_span_mask_and_renormalisation_match_the_reference(spans):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 21, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 21, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 21, 2, 8)).astype(np.float32)
  got = attention.adaptive_span(q, k, v, spans=jnp.asarray(spans), max_span=8, span_ramp=3.0,
                                causal=True)
  want = reference_adaptive_attention(q, k, v, spans, max_span=8, ramp=3.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_soft_mask_is_the_papers_ramp():
  """m_z(x) = clamp((R + z - x) / R, 0, 1), written out point by point."""
  distance = np.arange(12)
  z, ramp = np.array([0.0, 2.5, 9.0]), 4.0
  want = [[min(max((ramp + zh - x) / ramp, 0.0), 1.0) for x in distance] for zh in z]
  np.testing.assert_allclose(attention.soft_mask(distance, z, ramp), want, atol=1e-7)


def _config(**attention_overrides):
  return testing.tiny_model_config('adaptive_span', positions='t5_bias',
                                   attention=dict(attention_overrides))


def _with_fraction(params, value):
  """params with every span_fraction leaf set to `value`."""
  mask = optimizer_lib.span_mask(params)
  return jax.tree.map(lambda m, p: jnp.full_like(p, value) if m else p, mask, params)


def _fractions(params):
  mask = optimizer_lib.span_mask(params)
  return np.concatenate([np.asarray(p) for m, p in zip(jax.tree.leaves(mask),
                                                        jax.tree.leaves(params)) if m])


def _objective(graphdef, ids, span_coef):
  def objective(params):
    logits, aux = nnx.merge(graphdef, params)(ids)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                        ids[:, 1:, None], axis=-1))
    return nll + span_coef * aux['span_penalty']
  return objective


def test_default_span_init_is_the_references_zero():
  assert models.ModelConfig().attention.span_init == 0.0
  assert testing.TINY_ATTENTION['span_init'] == 0.5  # the tiny models' spans start mid-way


@pytest.mark.parametrize('fraction', [0.0, 1.0])
def test_a_span_at_a_boundary_still_has_a_gradient(fraction):
  config = _config(max_span=8, span_ramp=2.0)
  graphdef, params = nnx.split(models.build(config, rngs=nnx.Rngs(0)), nnx.Param)
  params = _with_fraction(nnx.to_pure_dict(params), fraction)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 50, size=(2, 16)), jnp.int32)
  objective = _objective(graphdef, ids, span_coef=0.0)
  grads = jax.grad(objective)(params)
  # Every head gets a gradient (a clip of the fraction in the forward pass
  # would give exactly 0 past a boundary). Not compared with a one-sided
  # difference: at a boundary the mask's clamp has a kink, and autodiff takes
  # a subgradient there (as the reference's torch.clamp does).
  assert np.all(np.isfinite(_fractions(grads)))
  assert np.all(_fractions(grads) != 0.0), _fractions(grads)


def test_the_optimizer_clamps_spans_into_the_unit_interval_and_they_move_back():
  config = _config(max_span=8, span_ramp=2.0)
  graphdef, params = nnx.split(models.build(config, rngs=nnx.Rngs(0)), nnx.Param)
  params = _with_fraction(nnx.to_pure_dict(params), 0.0)
  ids = jnp.asarray(np.random.default_rng(2).integers(3, 50, size=(2, 16)), jnp.int32)
  settings = optimizer_lib.OptimizerConfig(
      learning_rate=5.0, warmup_steps=0, lr_schedule='constant', min_lr_ratio=0.0,
      num_train_steps=10, weight_decay=0.1, adam_b1=0.0, adam_b2=0.999, grad_clip=1.0)
  schedule = optimizer_lib.learning_rate_schedule(settings)
  decay = optimizer_lib.weight_decay_mask(nnx.state(models.build(config, rngs=nnx.Rngs(0)),
                                                    nnx.Param))
  spans = optimizer_lib.span_mask(params)
  tx = optimizer_lib.make_optimizer(settings, schedule, decay, spans)
  plain = optimizer_lib.make_optimizer(settings, schedule, decay)
  # The clamp keeps the optimizer state's layout: checkpoints restore either way.
  assert (jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params)))
  state = tx.init(params)

  def step(params, state, span_coef):
    grads = jax.grad(_objective(graphdef, ids, span_coef))(params)
    plain_updates, _ = plain.update(grads, state, params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    unclamped = optax.apply_updates(params, plain_updates)
    # Every other weight is updated exactly as without the clamp.
    for m, a, b in zip(jax.tree.leaves(spans), jax.tree.leaves(new), jax.tree.leaves(unclamped)):
      if not m:
        np.testing.assert_array_equal(a, b)
    return new, state, _fractions(unclamped)

  # At 0, a span penalty pushes past 0: clamped to exactly 0, not below.
  params, state, unclamped = step(params, state, span_coef=10.0)
  assert np.all(unclamped < 0.0)
  np.testing.assert_array_equal(_fractions(params), 0.0)
  # ... where they still get a gradient (past 0 they would get none).
  assert np.all(_fractions(jax.grad(_objective(graphdef, ids, 0.0))(params)) != 0.0)
  # A negative coefficient (spans rewarded) moves them back up, by lr = 5:
  # past 1 without the clamp, exactly 1 with it.
  params, state, unclamped = step(params, state, span_coef=-10.0)
  assert np.all(unclamped > 1.0)
  np.testing.assert_array_equal(_fractions(params), 1.0)
  # And from 1 back down, into the interval.
  params, state, unclamped = step(params, state, span_coef=10.0)
  fractions = _fractions(params)
  assert np.all(unclamped < 1.0)
  assert np.all((fractions >= 0.0) & (fractions < 1.0)), fractions


def test_span_mask_finds_only_span_fractions():
  for kind, expected in (('adaptive_span', True), ('local', False)):
    config = testing.tiny_model_config(kind)
    params = nnx.to_pure_dict(nnx.state(models.build(config, rngs=nnx.Rngs(0)), nnx.Param))
    mask = optimizer_lib.span_mask(params)
    if not expected:
      assert mask is None
      continue
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    marked = [jax.tree_util.keystr(path) for path, m in flat if m]
    assert len(marked) == config.num_layers
    assert all(name.endswith("['attention']['span_fraction']") for name in marked)


def test_model_reports_each_layers_and_heads_span():
  config = testing.tiny_model_config('adaptive_span', attention=dict(max_span=20))
  model = models.build(config, rngs=nnx.Rngs(0))
  fractions = [np.array([0.0, 0.25, 0.5, 1.0]), np.array([0.1, 0.2, 0.3, 0.4])]
  for block, f in zip(model.decoder.blocks, fractions):
    block.attention.span_fraction[...] = jnp.asarray(f, jnp.float32)
  _, aux = model(jnp.ones((1, 8), jnp.int32))
  assert sorted(aux['head_spans']) == [0, 1]
  for layer, f in enumerate(fractions):
    np.testing.assert_allclose(aux['head_spans'][layer], 20 * f, rtol=1e-6)
  np.testing.assert_allclose(aux['mean_span'], 20 * np.mean(fractions), rtol=1e-6)
