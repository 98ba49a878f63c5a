"""Imported HF decoders compute what transformers computes; export round-trips bitwise.

The reference is transformers' own PyTorch forward pass (4.57.6, fp32): a tiny
random model is built by its class, saved with `save_pretrained` (the real
on-disk format: config.json + model.safetensors with PyTorch names and
[out, in] weights), imported by `longjax.convert`, and both are run on the
same random tokens. Needs torch (the `convert` test extra); skipped without it.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flax import nnx  # pylint: disable=g-import-not-at-top

from longjax import models  # pylint: disable=g-import-not-at-top
from longjax.convert import checkpoints, hf_files  # pylint: disable=g-import-not-at-top
from longjax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top

TINY = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=5000.0)

CASES = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(tie_word_embeddings=False)),
    'llama_tied': ('LlamaConfig', 'LlamaForCausalLM', dict(tie_word_embeddings=True)),
    'llama3_scaled': ('LlamaConfig', 'LlamaForCausalLM', dict(
        tie_word_embeddings=False, rope_scaling=dict(
            rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))),
    'llama_yarn': ('LlamaConfig', 'LlamaForCausalLM', dict(
        tie_word_embeddings=False, rope_scaling=dict(
            rope_type='yarn', factor=4.0, original_max_position_embeddings=32))),
    'llama_linear': ('LlamaConfig', 'LlamaForCausalLM', dict(
        tie_word_embeddings=False, rope_scaling=dict(rope_type='linear', factor=4.0))),
    # Dynamic NTK acts beyond max_position_embeddings: 32 < the 96 tokens run.
    'llama_dynamic': ('LlamaConfig', 'LlamaForCausalLM', dict(
        tie_word_embeddings=False, max_position_embeddings=32,
        rope_scaling=dict(rope_type='dynamic', factor=4.0))),
    'mistral_window': ('MistralConfig', 'MistralForCausalLM', dict(
        sliding_window=8, tie_word_embeddings=False)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(tie_word_embeddings=True)),
}


def save_reference(case: str, directory: str):
  config_class, model_class, extra = CASES[case]
  config = getattr(transformers, config_class)(**{**TINY, **extra})
  if case == 'mistral_window':
    config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = getattr(transformers, model_class)(config).eval()
  with torch.no_grad():  # random norm scales and biases, so a mix-up cannot hide
    for name, parameter in model.named_parameters():
      if name.endswith('norm.weight') or name.endswith('.bias'):
        parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter) if 'norm' in name
                        else 0.3 * torch.randn_like(parameter))
  model.save_pretrained(directory)
  return model


def longjax_model(block, params):
  """The longjax model of an imported block, holding the imported parameters."""
  config = ModelConfig.from_config(dict(block, dtype='float32', param_dtype='float32'))
  model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))
  graph, state = nnx.split(model, nnx.Param)

  def fill(tree, prefix=()):
    return {k: fill(v, prefix + (k,)) if isinstance(v, dict) else
            params[checkpoints._key(prefix + (k,))] for k, v in tree.items()}  # pylint: disable=protected-access

  nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state)))
  return nnx.merge(graph, state)


def nested(params):
  """{path: array} -> the nested parameter dict a run's state holds."""
  tree = {}
  for path, value in params.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def reference_logits(reference, seed, length):
  """Random tokens [2, length] and transformers' logits of them."""
  tokens = np.random.default_rng(seed).integers(0, TINY['vocab_size'], size=(2, length))
  with torch.no_grad():
    return tokens, reference(torch.tensor(tokens)).logits.numpy()


def longjax_logits(block, params, tokens):
  logits, _ = longjax_model(block, params)(np.asarray(tokens, np.int32))
  return np.asarray(logits)


@pytest.mark.parametrize('case', list(CASES))
def test_imported_logits_equal_transformers(tmp_path, case):
  reference = save_reference(case, str(tmp_path / 'hf'))
  block, params = checkpoints.import_hf(str(tmp_path / 'hf'))
  # Long enough that the scaled RoPE, the sliding window (8) and GQA all matter.
  tokens, expected = reference_logits(reference, 1, 96)
  got = longjax_logits(block, params, tokens)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('case', ['llama', 'mistral_window', 'qwen2', 'llama_dynamic'])
def test_export_round_trips_bitwise(tmp_path, case):
  save_reference(case, str(tmp_path / 'hf'))
  block, params = checkpoints.import_hf(str(tmp_path / 'hf'))
  model = ModelConfig.from_config(block)
  checkpoints.export_hf(model, nested(params), str(tmp_path / 'out'))
  original = hf_files.TensorReader(str(tmp_path / 'hf'))
  exported = hf_files.TensorReader(str(tmp_path / 'out'))
  names = [n for n in original.names() if not (model.tie_embeddings and n == 'lm_head.weight')]
  assert exported.names() == names
  for name in names:
    a, b = original.get(name), exported.get(name)
    assert a.dtype == b.dtype and np.array_equal(a, b), name
  # transformers loads the export and computes the same logits as the original.
  with open(tmp_path / 'out' / 'config.json') as f:
    assert json.load(f)['architectures'] == [CASES[case][1]]
  reloaded = getattr(transformers, CASES[case][1]).from_pretrained(str(tmp_path / 'out')).eval()
  first = getattr(transformers, CASES[case][1]).from_pretrained(str(tmp_path / 'hf')).eval()
  tokens = torch.tensor(np.random.default_rng(2).integers(0, TINY['vocab_size'], size=(1, 40)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), first(tokens).logits.numpy())


def test_bad_checkpoints_fail_naming_the_key(tmp_path):
  save_reference('llama', str(tmp_path / 'hf'))
  config_path = tmp_path / 'hf' / 'config.json'
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(dict(config, hidden_act='gelu')))
  with pytest.raises(hf_files.HFFormatError, match="hidden_act='gelu' is not supported"):
    checkpoints.import_hf(str(tmp_path / 'hf'))
  config_path.write_text(json.dumps(dict(config, num_key_value_heads=4)))
  with pytest.raises(hf_files.HFFormatError, match='self_attn.k_proj.weight: shape'):
    checkpoints.import_hf(str(tmp_path / 'hf'))
  config_path.write_text(json.dumps(dict(config, architectures=['GPT2LMHeadModel'])))
  with pytest.raises(hf_files.HFFormatError, match='longjax imports LlamaForCausalLM'):
    checkpoints.import_hf(str(tmp_path / 'hf'))
  config_path.write_text(json.dumps(dict(config, num_hidden_layers=1)))
  with pytest.raises(hf_files.HFFormatError, match='have no place.*model.layers.1'):
    checkpoints.import_hf(str(tmp_path / 'hf'))
  os.remove(tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(hf_files.HFFormatError, match='neither model.safetensors'):
    checkpoints.import_hf(str(tmp_path / 'hf'))


def test_sharded_checkpoints_import_the_same(tmp_path):
  reference = save_reference('llama', str(tmp_path / 'hf'))
  reference.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='100KB')
  shards = [n for n in os.listdir(tmp_path / 'sharded') if n.endswith('.safetensors')]
  assert len(shards) > 2 and os.path.exists(tmp_path / 'sharded' / hf_files.INDEX)
  _, whole = checkpoints.import_hf(str(tmp_path / 'hf'))
  _, sharded = checkpoints.import_hf(str(tmp_path / 'sharded'))
  assert whole.keys() == sharded.keys()
  assert all(np.array_equal(whole[k], sharded[k]) for k in whole)
  os.remove(tmp_path / 'sharded' / shards[0])
  with pytest.raises(hf_files.HFFormatError, match=f'shard {shards[0]} is listed but missing'):
    checkpoints.import_hf(str(tmp_path / 'sharded'))


T5_TINY = dict(vocab_size=259, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=32,
               dropout_rate=0.0, layer_norm_epsilon=1e-6)
T5_CASES = {
    't5_v1_1': ('T5Config', 'T5ForConditionalGeneration',
                dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False)),
    't5_v1_0_tied': ('T5Config', 'T5ForConditionalGeneration',
                     dict(feed_forward_proj='relu', tie_word_embeddings=True)),
    'longt5_local': ('LongT5Config', 'LongT5ForConditionalGeneration', dict(
        feed_forward_proj='gated-gelu', tie_word_embeddings=False,
        encoder_attention_type='local', local_radius=5)),
    'longt5_tglobal': ('LongT5Config', 'LongT5ForConditionalGeneration', dict(
        feed_forward_proj='gated-gelu', tie_word_embeddings=False,
        encoder_attention_type='transient-global', local_radius=5, global_block_size=8)),
}


def save_t5_reference(case, directory):
  config_class, model_class, extra = T5_CASES[case]
  config = getattr(transformers, config_class)(**T5_TINY, **extra)
  torch.manual_seed(0)
  model = getattr(transformers, model_class)(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if 'norm' in name:
        parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize('case', list(T5_CASES))
def test_imported_encoder_decoders_equal_transformers(tmp_path, case):
  reference = save_t5_reference(case, str(tmp_path / 'hf'))
  block, params = checkpoints.import_hf(str(tmp_path / 'hf'))
  rng = np.random.default_rng(3)
  # Sources past several local windows and global blocks, with an orphan block (45 % 8).
  source = rng.integers(2, T5_TINY['vocab_size'], size=(2, 45))
  target = rng.integers(2, T5_TINY['vocab_size'], size=(2, 13))
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(source),
                         decoder_input_ids=torch.tensor(target)).logits.numpy()
  logits, _ = longjax_model(block, params)(np.asarray(source, np.int32),
                                           np.asarray(target, np.int32))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
  # And back: the same tensors bit for bit (d_kv = 16: the query's sqrt(d_kv) = 4 is exact).
  checkpoints.export_hf(ModelConfig.from_config(block), nested(params), str(tmp_path / 'out'))
  original = hf_files.TensorReader(str(tmp_path / 'hf'))
  exported = hf_files.TensorReader(str(tmp_path / 'out'))
  for name in exported.names():
    assert np.array_equal(original.get(name), exported.get(name)), name
  assert set(original.names()) - set(exported.names()) <= {
      'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'lm_head.weight'}


def test_attention_conversion_keeps_the_weights_and_copies_longformers_globals(tmp_path):
  reference = save_reference('llama', str(tmp_path / 'hf'))
  block, params = checkpoints.import_hf(str(tmp_path / 'hf'))
  tokens, expected = reference_logits(reference, 1, 96)
  # Local layers whose window covers the row compute full attention: the logits stay.
  wide = dict(block, attention=dict(block['attention'], layer_pattern=('local', 'full'),
                                    radius=200))
  same, fresh = checkpoints.converted(params, ModelConfig.from_config(wide))
  assert fresh == []
  np.testing.assert_allclose(longjax_logits(wide, same, tokens), expected, atol=1e-4, rtol=0)
  # A narrow window changes them (the conversion is real).
  narrow = dict(wide, attention=dict(wide['attention'], radius=4))
  assert np.abs(longjax_logits(narrow, same, tokens) - expected).max() > 1e-2
  # global_local: Longformer's global projections start as the local ones.
  longformer = dict(block, attention=dict(block['attention'], kind='global_local', radius=8,
                                          num_global=2))
  copied, fresh = checkpoints.converted(params, ModelConfig.from_config(longformer))
  assert fresh == []
  for i in range(TINY['num_hidden_layers']):
    for name in ('q', 'k', 'v'):
      att = ('decoder', 'blocks', i, 'attention')
      assert np.array_equal(copied[att + (f'w{name}_global',)], copied[att + (f'w{name}',)])
  # transient_global: the summary norms and the summaries' bias table are new (their
  # initialisers); they are listed, not invented.
  tglobal = dict(block, attention=dict(block['attention'], kind='transient_global', radius=8,
                                       summary_block=8))
  _, fresh = checkpoints.converted(params, ModelConfig.from_config(tglobal))
  assert sorted(fresh) == sorted([f'decoder/blocks/{i}/attention/summary_norm/scale'
                                  for i in range(TINY['num_hidden_layers'])] +
                                 ['decoder/summary_bias/table'])
  with pytest.raises(hf_files.HFFormatError, match='needs'):
    checkpoints.converted(params, ModelConfig.from_config(dict(block, mlp_dim=32)))


def test_python_api_from_hf_and_to_hf(tmp_path):
  reference = save_reference('qwen2', str(tmp_path / 'hf'))
  config, model = checkpoints.from_hf(str(tmp_path / 'hf'))
  tokens, expected = reference_logits(reference, 5, 40)
  np.testing.assert_allclose(np.asarray(model(np.asarray(tokens, np.int32))[0]), expected,
                             atol=1e-4, rtol=0)
  checkpoints.to_hf(config, model, str(tmp_path / 'out'))
  original, exported = (hf_files.TensorReader(str(tmp_path / d)) for d in ('hf', 'out'))
  assert all(np.array_equal(original.get(n), exported.get(n)) for n in exported.names())

