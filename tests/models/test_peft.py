"""LoRA through Qwix: what the adapters compute, what trains, what decoding sees.

References: the LoRA equation written out (W + (alpha / r) A B, merged by
hand into a model without adapters, whose forward has no Qwix in it), the
base model itself for fresh adapters (B = 0), and the saved weights of a
real training run (the base bitwise unchanged).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longjax import models
from longjax.models import peft, testing
from longjax.train import setup, trainer
from tests.train.train_testing import restore_state, tiny_config

pytest.importorskip('qwix')

LORA = models.PeftConfig(method='lora', rank=4, alpha=8.0)


def _adapted(kind='local', **overrides):
  config = testing.tiny_model_config(kind, tile_tokens=0, **overrides)
  config = dataclasses.replace(config, peft=LORA)
  return config, models.build(config, rngs=nnx.Rngs(0))


def _randomised_adapters(model):
  """Nonzero B (Qwix starts it at zero), so the adapters change the output."""
  graph, params = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  keys = iter(jax.random.split(jax.random.key(7), 10_000))
  pure = jax.tree_util.tree_map_with_path(
      lambda path, v: 0.1 * jax.random.normal(next(keys), v.shape) if str(
          path[-1].key).endswith('_lora_b') else v, pure)
  nnx.replace_by_pure_dict(params, pure)
  return graph, params, pure


@pytest.mark.parametrize('arch, kind', [('lm', 'local'), ('lm', 'global_local'),
                                        ('encoder_decoder', 'transient_global')])
def test_merged_weights_equal_the_adapted_model(arch, kind):
  extra = dict(arch='encoder_decoder', positions='t5_bias') if arch != 'lm' else {}
  config, model = _adapted(kind, **extra)
  graph, params, pure = _randomised_adapters(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 3, config.vocab_size)
  inputs = (tokens, tokens[:, :16]) if arch != 'lm' else (tokens,)
  adapted = nnx.merge(graph, params)
  got, _ = adapted.hidden(*inputs)
  plain = models.build(peft.without_adapters(config), rngs=nnx.Rngs(0))
  _, plain_params = nnx.split(plain, nnx.Param)
  nnx.replace_by_pure_dict(plain_params, peft.merged(config, pure))
  nnx.update(plain, plain_params)
  expected, _ = plain.hidden(*inputs)
  without, _ = models.build(peft.without_adapters(config), rngs=nnx.Rngs(0)).hidden(*inputs)
  assert float(jnp.abs(got - without).max()) > 1e-2  # the adapters do something
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
  # Decoding's (graphdef, params) are the merged model's.
  decode_graph, decode_params = peft.for_decoding(graph, pure)
  again, _ = nnx.merge(decode_graph, decode_params).hidden(*inputs)
  np.testing.assert_allclose(np.asarray(again), np.asarray(expected), atol=1e-6, rtol=0)


def test_fresh_adapters_change_nothing_and_targets_choose_the_modules():
  config, model = _adapted('full')
  tokens = jnp.arange(20)[None] % config.vocab_size
  base = models.build(peft.without_adapters(config), rngs=nnx.Rngs(0))
  names = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
           if peft.is_adapter(p)}
  assert 'decoder/blocks/0/attention/wq_lora_a' in names
  assert 'decoder/blocks/1/mlp/wo_lora_b' in names
  assert not any(n.startswith('embedder') for n in names)  # the head is not a target
  # The base weights are the same draw with or without adapters, and B = 0.
  np.testing.assert_array_equal(np.asarray(model.hidden(tokens)[0]),
                                np.asarray(base.hidden(tokens)[0]))
  mlp_only = dataclasses.replace(config, peft=dataclasses.replace(LORA, targets=r'.*mlp'))
  adapted = models.build(mlp_only, rngs=nnx.Rngs(0))
  names = [p for p, _ in nnx.to_flat_state(nnx.state(adapted, nnx.Param)) if peft.is_adapter(p)]
  assert names and all('mlp' in p for p in names)
  with pytest.raises(ValueError, match='matches no projection'):
    models.build(dataclasses.replace(config, peft=dataclasses.replace(LORA, targets='nothing')),
                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize('overrides, error', [
    (dict(method='qlora'), "model.peft.method: 'qlora' is not one of"),
    (dict(rank=0), 'model.peft.rank: must be an int >= 1'),
    (dict(alpha=0.0), 'model.peft.alpha: must be > 0'),
    (dict(targets='(('), 'model.peft.targets'),
])
def test_bad_peft_fields_name_the_field(overrides, error):
  with pytest.raises(ValueError, match=error):
    testing.tiny_model_config('local', peft=dict(dataclasses.asdict(LORA), **overrides))


@pytest.mark.slow
def test_training_updates_only_the_adapters(tmp_path):
  config = tiny_config(model__peft__method='lora', model__peft__rank=4, model__dtype='float32',
                       num_train_steps=6, learning_rate=1e-2)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  before = jax.device_get(setup.build_run(config, str(tmp_path / 'run')).fresh_state())  # step 0
  _, after = restore_state(config, str(tmp_path / 'run'))
  flat_before = dict(jax.tree_util.tree_leaves_with_path(before.params))
  flat_after = dict(jax.tree_util.tree_leaves_with_path(after.params))
  changed = [k for k in flat_after if not np.array_equal(flat_before[k], flat_after[k])]
  adapters = [k for k in flat_after if str(k[-1].key).endswith(peft.ADAPTER_SUFFIXES)]
  assert changed and set(changed) <= set(adapters)  # base weights bitwise as initialised
  assert any(str(k[-1].key).endswith('_lora_b') for k in changed)
  # Adam's moments exist for the adapters only.
  moments = [leaf for leaf in jax.tree.leaves(after.opt_state) if np.ndim(leaf) > 0]
  assert sum(np.size(m) for m in moments) == 2 * sum(np.size(flat_after[k]) for k in adapters)
