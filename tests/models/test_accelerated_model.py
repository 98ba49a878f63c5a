"""A model on the accelerator kernels equals the same model on the XLA kernels.

The kernels run interpreted on CPU (model.attention.implementation = 'splash'
or 'pallas_gpu'), inside the model as training runs them: under jit, with
packed segment ids, with remat of attention, and, in a 4-device subprocess,
under a (data, tensor) mesh where each device runs the kernel on its shard
(sharding.per_shard) instead of GSPMD gathering the batch.
"""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax import models
from tests.train import train_testing


def _config(kind, implementation, **overrides):
  attention = dict(kind=kind, radius=24, num_global=4, chunk_size=32,
                   implementation=implementation)
  attention.update(overrides.pop('attention', {}))
  return models.ModelConfig.from_config(dict(
      arch='lm', num_layers=2, emb_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
      vocab_size=50, max_len=512, dtype='float32', attention=attention, **overrides))


def _loss_and_grads(config, ids, segment_ids):
  model = models.build(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(ids, segment_ids=segment_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

  return jax.jit(jax.value_and_grad(loss))(params)


def _batch(length=200):
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 50, (2, length)), jnp.int32)
  segments = np.ones((2, length), np.int32)
  segments[0, 90:] = 2
  segments[1, 150:] = 0
  return ids, jnp.asarray(segments)


@pytest.mark.parametrize('kind,implementation,remat', [
    ('local', 'pallas_gpu', 'attention'),
    pytest.param('global_local', 'pallas_gpu', 'none', marks=pytest.mark.slow),
    pytest.param('chunked', 'splash', 'attention', marks=pytest.mark.slow),
    pytest.param('full', 'splash', 'none', marks=pytest.mark.slow),
])
def test_lm_on_accelerator_kernels_equals_xla(kind, implementation, remat):
  ids, segments = _batch()
  want_loss, want_grads = _loss_and_grads(_config(kind, 'xla', remat=remat), ids, segments)
  loss, grads = _loss_and_grads(_config(kind, implementation, remat=remat), ids, segments)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)


def test_t5_bias_with_a_fused_kernel_is_refused_when_validated():
  with pytest.raises(ValueError, match='model.attention.implementation'):
    _config('local', 'pallas_gpu', positions='t5_bias')


SCRIPT = textwrap.dedent('''
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from flax import nnx
    from longjax import sharding
    from tests.models import test_accelerated_model as t

    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, sequence=1))
    ids, segments = t._batch(160)
    want_loss, want_grads = t._loss_and_grads(t._config('local', 'xla'), ids, segments)
    with sharding.axis_rules(mesh):
        loss, grads = t._loss_and_grads(t._config('local', 'pallas_gpu'), ids, segments)
        text = jax.jit(lambda i, s: t._loss_and_grads(t._config('local', 'pallas_gpu'), i, s)[0]
                       ).lower(ids, segments).as_text()
    assert 'shard_map' in text or 'sdy.manual_computation' in text, 'no per-shard kernel'
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)
    print('PER SHARD OK')
''')


@pytest.mark.slow
def test_kernels_run_per_shard_on_a_mesh():
  result = train_testing.run_python(['-c', SCRIPT], env=train_testing.subprocess_env(4),
                                    timeout=900)
  assert 'PER SHARD OK' in result.stdout, result.stderr[-4000:]
