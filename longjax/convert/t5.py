"""T5 v1.0 / v1.1 and LongT5 (local and TGlobal encoders) onto longjax's EncoderDecoder.

T5 (Raffel et al. 2020; transformers' `modeling_t5.py` / `modeling_longt5.py`)
is longjax's encoder-decoder with `model.positions = 't5_bias'`: RMSNorm
without a mean (`T5LayerNorm`, `layer_norm_epsilon`), one relative-position
bias table per stack (HF keeps it in block 0 and shares it), an MLP that is
gated GELU (tanh approximation, `gelu_new`; v1.1, LongT5), gated SiLU or ReLU
(v1.0), one embedding shared by encoder and decoder, and a readout that is
either untied (`lm_head`, v1.1) or tied and scaled by d_model^-1/2 (v1.0:
`model.scale_tied_logits`). LongT5's encoder is `local` (radius
`local_radius`: HF's block-local mask keeps |i - j| <= local_radius) or
`transient_global` (radius and `global_block_size`; the summaries' own bias
table and per-layer `global_input_layer_norm`) — the kinds whose layer-level
parity tests/models/test_longt5_parity.py proves.

T5 does not scale attention scores by 1/sqrt(d_kv) (it folds that into its
initialisation); longjax does, so the imported query weights carry
sqrt(d_kv): exact in binary when d_kv is a power of 4 (64 in every released
T5 and LongT5), so a round trip is bitwise there.
"""
from __future__ import annotations

import math
from typing import Mapping

from longjax.convert.architectures import (ENCODER_DECODERS, Tensor, architecture, heads_in,
                                           heads_out, same, transpose)
from longjax.convert.hf_files import HFFormatError

# T5's feed_forward_proj and the activation it implies -> longjax's MLP.
_MLPS = {('gated-gelu', 'gelu_new'): 'geglu', ('gated-silu', 'silu'): 'swiglu',
         ('relu', 'relu'): 'relu'}
_ATTENTION = {'t5': 'SelfAttention', 'local': 'LocalSelfAttention',
              'transient-global': 'TransientGlobalSelfAttention'}
_KINDS = {'t5': 'full', 'local': 'local', 'transient-global': 'transient_global'}


def _encoder_type(hf_config: Mapping) -> str:
  if ENCODER_DECODERS[architecture(hf_config)] == 't5':
    return 't5'
  kind = hf_config.get('encoder_attention_type', 'local')
  if kind not in _ATTENTION:
    raise HFFormatError(f'config.json encoder_attention_type={kind!r}: LongT5 has local and '
                        'transient-global.')
  return kind


def model_block(hf_config: Mapping) -> dict:
  projection = hf_config.get('feed_forward_proj', 'relu')
  gated = projection.startswith('gated-')
  activation = hf_config.get('dense_act_fn', projection.split('-')[-1])
  if projection == 'gated-gelu' and activation == 'gelu':  # T5Config's own alias
    activation = 'gelu_new'
  mlp = _MLPS.get((projection, activation))
  if mlp is None:
    raise HFFormatError(f'config.json feed_forward_proj={projection!r} with dense_act_fn='
                        f'{activation!r} is not supported (longjax has gated-gelu with gelu_new, '
                        'gated-silu and relu).')
  del gated
  encoder = _encoder_type(hf_config)
  attention = dict(kind=_KINDS[encoder], decoder_kind='full', layer_pattern=())
  if encoder != 't5':
    attention['radius'] = int(hf_config.get('local_radius', 127))
  if encoder == 'transient-global':
    attention['summary_block'] = int(hf_config.get('global_block_size', 16))
  heads = int(hf_config['num_heads'])
  return dict(
      arch='encoder_decoder', num_layers=int(hf_config['num_layers']),
      num_decoder_layers=int(hf_config.get('num_decoder_layers') or hf_config['num_layers']),
      emb_dim=int(hf_config['d_model']), num_heads=heads, num_kv_heads=heads,
      head_dim=int(hf_config['d_kv']), mlp_dim=int(hf_config['d_ff']), mlp_activation=mlp,
      vocab_size=int(hf_config['vocab_size']),
      tie_embeddings=bool(hf_config.get('tie_word_embeddings', True)), scale_tied_logits=True,
      positions='t5_bias', t5_num_buckets=int(hf_config.get('relative_attention_num_buckets', 32)),
      t5_max_distance=int(hf_config.get('relative_attention_max_distance', 128)),
      norm_eps=float(hf_config.get('layer_norm_epsilon', 1e-6)), qkv_bias=False,
      dropout_rate=0.0, attention=attention)


def _attention(hf: str, path: tuple, model) -> list[Tensor]:
  h, d = model.num_heads, model.head_dim
  return [Tensor(hf + 'q.weight', path + ('wq',), *heads_in(h, d, math.sqrt(d))),
          Tensor(hf + 'k.weight', path + ('wk',), *heads_in(h, d)),
          Tensor(hf + 'v.weight', path + ('wv',), *heads_in(h, d)),
          Tensor(hf + 'o.weight', path + ('wo',), *heads_out(h, d))]


def _mlp(hf: str, path: tuple, model) -> list[Tensor]:
  if model.mlp_activation == 'relu':
    up = [Tensor(hf + 'wi.weight', path + ('wi_up',), transpose, transpose)]
  else:
    up = [Tensor(hf + 'wi_0.weight', path + ('wi_gate',), transpose, transpose),
          Tensor(hf + 'wi_1.weight', path + ('wi_up',), transpose, transpose)]
  return up + [Tensor(hf + 'wo.weight', path + ('wo',), transpose, transpose)]


def _norm(hf: str, path: tuple) -> Tensor:
  return Tensor(hf + 'layer_norm.weight', path + ('scale',), same, same)


def tensors(model) -> list[Tensor]:
  encoder = {'full': 't5', 'local': 'local', 'transient_global': 'transient-global'}[
      model.attention.kind]
  attention = _ATTENTION[encoder]
  out = [Tensor('shared.weight', ('embedder', 'token', 'table'), same, same),
         Tensor('encoder.final_layer_norm.weight', ('encoder', 'final_norm', 'scale'), same, same),
         Tensor('decoder.final_layer_norm.weight', ('decoder', 'final_norm', 'scale'), same, same),
         Tensor(f'encoder.block.0.layer.0.{attention}.relative_attention_bias.weight',
                ('encoder', 'relative_bias', 'table'), same, same),
         Tensor('decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                ('decoder', 'relative_bias', 'table'), same, same)]
  if not model.tie_embeddings:
    out.append(Tensor('lm_head.weight', ('embedder', 'head'), transpose, transpose))
  if encoder == 'transient-global':
    out.append(Tensor(f'encoder.block.0.layer.0.{attention}.global_relative_attention_bias.weight',
                      ('encoder', 'summary_bias', 'table'), same, same))
  for i in range(model.num_layers):
    hf, block = f'encoder.block.{i}.', ('encoder', 'blocks', i)
    out += _attention(f'{hf}layer.0.{attention}.', block + ('attention',), model)
    out += [_norm(hf + 'layer.0.', block + ('attention_norm',)),
            _norm(hf + 'layer.1.', block + ('mlp_norm',))]
    out += _mlp(hf + 'layer.1.DenseReluDense.', block + ('mlp',), model)
    if encoder == 'transient-global':
      out.append(Tensor(f'{hf}layer.0.{attention}.global_input_layer_norm.weight',
                        block + ('attention', 'summary_norm', 'scale'), same, same))
  for i in range(model.num_decoder_layers):
    hf, block = f'decoder.block.{i}.', ('decoder', 'blocks', i)
    out += _attention(hf + 'layer.0.SelfAttention.', block + ('attention',), model)
    out += _attention(hf + 'layer.1.EncDecAttention.', block + ('cross_attention',), model)
    out += [_norm(hf + 'layer.0.', block + ('attention_norm',)),
            _norm(hf + 'layer.1.', block + ('cross_norm',)),
            _norm(hf + 'layer.2.', block + ('mlp_norm',))]
    out += _mlp(hf + 'layer.2.DenseReluDense.', block + ('mlp',), model)
  return out


# Tensors HF writes that are the shared embedding again (save_pretrained may keep them).
ALIASES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


def hf_config(model, architecture_name: str = '') -> dict:
  problems = []
  kinds = set(model.layer_kinds())
  if len(kinds) > 1 or model.attention.decoder_kind != 'full':
    problems.append(f'encoder kinds {sorted(kinds)}, decoder kind {model.attention.decoder_kind} '
                    '(T5: one encoder kind of full, local, transient_global; a full decoder)')
  kind = next(iter(kinds))
  name = architecture_name or ('T5ForConditionalGeneration' if kind == 'full'
                               else 'LongT5ForConditionalGeneration')
  if ENCODER_DECODERS.get(name) != ('t5' if kind == 'full' else 'longt5'):
    problems.append(f'architecture {name!r} for a {kind} encoder')
  if model.positions != 't5_bias' or model.num_kv_heads != model.num_heads or model.qkv_bias:
    problems.append('positions other than t5_bias, grouped-query attention or q/k/v biases')
  if model.tie_embeddings and not model.scale_tied_logits:
    problems.append('tied embeddings without T5\'s d_model^-1/2 readout scale')
  mlp = {v: k for k, v in _MLPS.items()}.get(model.mlp_activation)
  if mlp is None:
    problems.append(f'model.mlp_activation={model.mlp_activation!r}')
  if problems:
    raise HFFormatError('cannot export to T5 / LongT5: ' + '; '.join(problems) + '.')
  config = dict(
      architectures=[name], model_type='t5' if kind == 'full' else 'longt5',
      d_model=model.emb_dim, d_kv=model.head_dim, d_ff=model.mlp_dim, num_heads=model.num_heads,
      num_layers=model.num_layers, num_decoder_layers=model.num_decoder_layers,
      vocab_size=model.vocab_size, feed_forward_proj=mlp[0], dense_act_fn=mlp[1],
      is_gated_act=mlp[0].startswith('gated-'),
      relative_attention_num_buckets=model.t5_num_buckets,
      relative_attention_max_distance=model.t5_max_distance,
      layer_norm_epsilon=model.norm_eps, tie_word_embeddings=bool(model.tie_embeddings),
      dropout_rate=0.0, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0)
  if kind != 'full':
    config.update(local_radius=model.attention.radius,
                  encoder_attention_type='local' if kind == 'local' else 'transient-global')
  if kind == 'transient_global':
    config['global_block_size'] = model.attention.summary_block
  return config
