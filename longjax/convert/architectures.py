"""Hugging Face decoder architectures onto longjax's LM, tensor by tensor, both ways
(encoder-decoders: t5.py).

Llama 2/3, Mistral and Qwen2 are longjax's `TransformerLM` exactly: pre-norm
blocks of RMSNorm (HF's `rms_norm_eps` -> `model.norm_eps`), grouped-query
attention with RoPE (HF's `rotate_half` pairs feature i with i + d/2, as
`layers.apply_rope`; `rope_theta` -> `model.rope_max_wavelength`,
`rope_scaling` linear / llama3 / yarn / dynamic -> `model.rope_scaling`; dynamic
NTK's original length is `max_position_embeddings`, and the imported model's
max_len is factor times it), a SwiGLU MLP
(down(silu(gate x) * up x)), a final norm and an untied or tied readout (tied:
plain x E^T, `model.scale_tied_logits = False`). Per architecture:
  * Mistral's `sliding_window` W: query i sees keys i - W < j <= i (HF's
    sliding-window causal mask), longjax `local` with radius W - 1;
  * Qwen2: biases on q, k, v (`model.qkv_bias`); its sliding window
    (`use_sliding_window`) is refused.

PyTorch stores a linear layer's weight as [out, in]; longjax keeps
[in, heads, head_dim] for q/k/v, [heads, head_dim, out] for the output and
[in, out] for the MLP: each `Tensor` holds the reshape both ways (transposes
and reshapes only, so a round trip is bitwise).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from longjax.convert.hf_files import HFFormatError

DECODERS = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
            'Qwen2ForCausalLM': 'qwen2'}
ENCODER_DECODERS = {'T5ForConditionalGeneration': 't5',
                    'LongT5ForConditionalGeneration': 'longt5'}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and the longjax parameter it becomes."""
  hf: str
  path: tuple
  to_longjax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def architecture(hf_config: Mapping) -> str:
  names = hf_config.get('architectures') or []
  known = [name for name in names if name in DECODERS or name in ENCODER_DECODERS]
  if not known:
    raise HFFormatError(f'config.json architectures={names}: longjax imports '
                        f'{", ".join([*DECODERS, *ENCODER_DECODERS])}.')
  return known[0]


def _require(hf_config: Mapping, key: str, allowed, why: str):
  value = hf_config.get(key, allowed[0])
  if value not in allowed:
    raise HFFormatError(f'config.json {key}={value!r} is not supported: {why}.')


def _rope_scaling(hf_config: Mapping) -> dict:
  scaling = hf_config.get('rope_scaling')
  if not scaling:
    return dict(rope_scaling='none')
  kind = scaling.get('rope_type', scaling.get('type'))
  if kind == 'default':
    return dict(rope_scaling='none')
  if kind == 'linear':
    return dict(rope_scaling='linear', rope_scaling_factor=float(scaling['factor']))
  if kind == 'llama3':
    return dict(rope_scaling='llama3', rope_scaling_factor=float(scaling['factor']),
                rope_low_freq_factor=float(scaling['low_freq_factor']),
                rope_high_freq_factor=float(scaling['high_freq_factor']),
                rope_original_max_len=int(scaling['original_max_position_embeddings']))
  if kind == 'yarn':
    for key in ('mscale', 'mscale_all_dim'):
      if scaling.get(key):
        raise HFFormatError(f'config.json rope_scaling.{key} is not supported (longjax\'s YaRN '
                            'takes attention_factor, or 0.1 ln(factor) + 1).')
    if scaling.get('truncate', True) is not True:
      raise HFFormatError('config.json rope_scaling.truncate=false is not supported.')
    original = scaling.get('original_max_position_embeddings') or hf_config.get(
        'max_position_embeddings', 2048)
    return dict(rope_scaling='yarn', rope_scaling_factor=float(scaling['factor']),
                rope_original_max_len=int(original),
                rope_beta_fast=float(scaling.get('beta_fast') or 32.0),
                rope_beta_slow=float(scaling.get('beta_slow') or 1.0),
                rope_attention_factor=float(scaling.get('attention_factor') or -1.0))
  if kind == 'dynamic':
    # transformers' dynamic NTK grows the base beyond max_position_embeddings (its
    # original length); the model may then run `factor` times longer (model.max_len).
    original = int(hf_config.get('max_position_embeddings', 2048))
    return dict(rope_scaling='dynamic', rope_scaling_factor=float(scaling['factor']),
                rope_original_max_len=original,
                max_len=int(round(original * float(scaling['factor']))))
  raise HFFormatError(f'config.json rope_scaling.rope_type={kind!r} is not supported (longjax '
                      'has none, linear, llama3, yarn and dynamic).')


def model_block(hf_config: Mapping) -> dict:
  """The longjax `model` fields of a HF config.json (its architecture only; compute
  settings such as dtype and remat are the task config's)."""
  if architecture(hf_config) in ENCODER_DECODERS:
    from longjax.convert import t5  # pylint: disable=g-import-not-at-top
    return t5.model_block(hf_config)
  family = DECODERS[architecture(hf_config)]
  _require(hf_config, 'hidden_act', ('silu',), 'the MLP is SwiGLU (silu)')
  _require(hf_config, 'mlp_bias', (False,), 'longjax MLPs have no biases')
  if family == 'llama':
    _require(hf_config, 'attention_bias', (False,), 'Llama attention biases include the '
             'output projection, which longjax does not have (Qwen2\'s q/k/v biases it has)')
  if family == 'qwen2':
    _require(hf_config, 'use_sliding_window', (False,), "Qwen2's sliding window applies only "
             'to layers from max_window_layers on, which longjax cannot express')
  heads = int(hf_config['num_attention_heads'])
  emb = int(hf_config['hidden_size'])
  block = dict(
      arch='lm', num_layers=int(hf_config['num_hidden_layers']), emb_dim=emb, num_heads=heads,
      num_kv_heads=int(hf_config.get('num_key_value_heads') or heads),
      head_dim=int(hf_config.get('head_dim') or emb // heads),
      mlp_dim=int(hf_config['intermediate_size']), mlp_activation='swiglu',
      vocab_size=int(hf_config['vocab_size']),
      tie_embeddings=bool(hf_config.get('tie_word_embeddings', False)), scale_tied_logits=False,
      positions='rope', rope_max_wavelength=float(hf_config.get('rope_theta', 10_000.0)),
      norm_eps=float(hf_config.get('rms_norm_eps', 1e-6)), qkv_bias=family == 'qwen2',
      dropout_rate=0.0, **{'max_len': int(hf_config.get('max_position_embeddings', 2048)),
                           **_rope_scaling(hf_config)})
  window = hf_config.get('sliding_window') if family == 'mistral' else None
  block['attention'] = (dict(kind='local', radius=int(window) - 1, layer_pattern=())
                        if window else dict(kind='full', layer_pattern=()))
  return block


def same(x):
  return x


def transpose(x):
  return np.ascontiguousarray(x.T)


def heads_in(heads: int, dim: int, scale: float = 1.0):
  """[heads * dim, in] <-> [in, heads, dim] (q, k, v), times `scale` into longjax."""
  scale = np.float32(scale)
  return (lambda w: np.ascontiguousarray(w.T.reshape(w.shape[1], heads, dim)) * scale,
          lambda w: np.ascontiguousarray((w / scale).reshape(w.shape[0], heads * dim).T))


def heads_out(heads: int, dim: int):
  """[out, heads * dim] <-> [heads, dim, out] (the output projection)."""
  return (lambda w: np.ascontiguousarray(w.T.reshape(heads, dim, w.shape[0])),
          lambda w: np.ascontiguousarray(w.reshape(heads * dim, w.shape[2]).T))


def _bias(heads: int, dim: int):
  return (lambda b: b.reshape(heads, dim), lambda b: b.reshape(heads * dim))


def tensors(model) -> list[Tensor]:
  """Every parameter of a longjax model (a ModelConfig) and its HF tensor."""
  if model.arch == 'encoder_decoder':
    from longjax.convert import t5  # pylint: disable=g-import-not-at-top
    return t5.tensors(model)
  return decoder_tensors(model)


def decoder_tensors(model) -> list[Tensor]:
  """Every parameter of a longjax LM (a ModelConfig) and its HF Llama-family tensor."""
  h, hk, d = model.num_heads, model.num_kv_heads, model.head_dim
  out = [Tensor('model.embed_tokens.weight', ('embedder', 'token', 'table'), same, same),
         Tensor('model.norm.weight', ('decoder', 'final_norm', 'scale'), same, same)]
  if not model.tie_embeddings:
    out.append(Tensor('lm_head.weight', ('embedder', 'head'), transpose, transpose))
  for i in range(model.num_layers):
    hf, block = f'model.layers.{i}.', ('decoder', 'blocks', i)
    att, mlp = block + ('attention',), block + ('mlp',)
    out += [
        Tensor(hf + 'input_layernorm.weight', block + ('attention_norm', 'scale'), same, same),
        Tensor(hf + 'post_attention_layernorm.weight', block + ('mlp_norm', 'scale'), same,
               same),
        Tensor(hf + 'self_attn.q_proj.weight', att + ('wq',), *heads_in(h, d)),
        Tensor(hf + 'self_attn.k_proj.weight', att + ('wk',), *heads_in(hk, d)),
        Tensor(hf + 'self_attn.v_proj.weight', att + ('wv',), *heads_in(hk, d)),
        Tensor(hf + 'self_attn.o_proj.weight', att + ('wo',), *heads_out(h, d)),
        Tensor(hf + 'mlp.gate_proj.weight', mlp + ('wi_gate',), transpose, transpose),
        Tensor(hf + 'mlp.up_proj.weight', mlp + ('wi_up',), transpose, transpose),
        Tensor(hf + 'mlp.down_proj.weight', mlp + ('wo',), transpose, transpose)]
    if model.qkv_bias:
      out += [Tensor(hf + 'self_attn.q_proj.bias', att + ('bq',), *_bias(h, d)),
              Tensor(hf + 'self_attn.k_proj.bias', att + ('bk',), *_bias(hk, d)),
              Tensor(hf + 'self_attn.v_proj.bias', att + ('bv',), *_bias(hk, d))]
  return out


def hf_config(model, architecture_name: str = '') -> dict:
  """The config.json of a longjax model as a HF architecture (export); raises where the
  model has something the architecture cannot hold."""
  if model.arch == 'encoder_decoder':
    from longjax.convert import t5  # pylint: disable=g-import-not-at-top
    return t5.hf_config(model, architecture_name)
  problems = []
  if model.arch != 'lm':
    problems.append(f"model.arch={model.arch!r} (only 'lm' exports to a HF decoder)")
  if model.positions != 'rope':
    problems.append(f'model.positions={model.positions!r} (HF decoders use rope)')
  if model.mlp_activation != 'swiglu':
    problems.append(f'model.mlp_activation={model.mlp_activation!r} (HF decoders: swiglu)')
  kinds = set(model.layer_kinds())
  if not kinds <= {'full'} and kinds != {'local'}:
    problems.append(f'attention kinds {sorted(kinds)} (exportable: full, or local everywhere '
                    'as Mistral\'s sliding window)')
  name = architecture_name or ('Qwen2ForCausalLM' if model.qkv_bias else
                               'MistralForCausalLM' if kinds == {'local'} else 'LlamaForCausalLM')
  family = DECODERS.get(name)
  if family is None:
    problems.append(f'architecture {name!r} (exportable: {", ".join(DECODERS)})')
  elif model.qkv_bias != (family == 'qwen2'):
    problems.append(f'model.qkv_bias={model.qkv_bias} ({name} '
                    f'{"has" if family == "qwen2" else "has no"} q/k/v biases)')
  if kinds == {'local'} and (model.rope_local_max_wavelength not in (-1.0, model.rope_max_wavelength)
                             or (not model.rope_scaling_local and model.rope_scaling != 'none')):
    problems.append('a RoPE base or scaling of local layers of their own (HF decoders have one)')
  if kinds == {'local'} and family != 'mistral':
    problems.append('local attention (only MistralForCausalLM has a sliding window)')
  if problems:
    raise HFFormatError('cannot export to a Hugging Face decoder: ' + '; '.join(problems) + '.')
  config = dict(
      architectures=[name], model_type=family, hidden_size=model.emb_dim,
      num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
      num_key_value_heads=model.num_kv_heads, head_dim=model.head_dim,
      intermediate_size=model.mlp_dim, hidden_act='silu', vocab_size=model.vocab_size,
      max_position_embeddings=(model.rope_original_max_len if model.rope_scaling == 'dynamic'
                               else model.max_len), rms_norm_eps=model.norm_eps,
      rope_theta=model.rope_max_wavelength, torch_dtype='float32',
      tie_word_embeddings=bool(model.tie_embeddings and not model.scale_tied_logits),
      rope_scaling=_hf_rope_scaling(model), attention_dropout=0.0)
  if family == 'mistral':
    config['sliding_window'] = model.attention.radius + 1 if kinds == {'local'} else None
  if family == 'llama':
    config.update(attention_bias=False, mlp_bias=False)
  if family == 'qwen2':
    config.update(use_sliding_window=False)
  return config


def _hf_rope_scaling(model):
  if model.rope_scaling == 'none':
    return None
  if model.rope_scaling in ('linear', 'dynamic'):
    return dict(rope_type=model.rope_scaling, factor=model.rope_scaling_factor)
  if model.rope_scaling == 'yarn':
    return dict(rope_type='yarn', factor=model.rope_scaling_factor,
                original_max_position_embeddings=model.rope_original_max_len,
                beta_fast=model.rope_beta_fast, beta_slow=model.rope_beta_slow,
                **({'attention_factor': model.rope_attention_factor}
                   if model.rope_attention_factor > 0 else {}))
  return dict(rope_type='llama3', factor=model.rope_scaling_factor,
              low_freq_factor=model.rope_low_freq_factor,
              high_freq_factor=model.rope_high_freq_factor,
              original_max_position_embeddings=model.rope_original_max_len)
