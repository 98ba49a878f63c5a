"""Typed, validated model settings, made from the `model` block of a config.

`ModelConfig.from_config(config.model)` turns the ml-collections block into a
frozen dataclass at the model boundary, so the model code reads typed fields
and every invalid combination fails here, with the field and the fix named,
before anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from longjax import attention

POSITIONS = ('rope', 't5_bias', 'learned')
REMAT_POLICIES = ('none', 'attention', 'dots', 'attention_out', 'full')
MLP_ACTIVATIONS = ('swiglu', 'geglu', 'gelu', 'relu')
MODEL_KINDS = ('lm', 'encoder_decoder')
# Decoder self-attention of the encoder-decoder: kinds whose causal form keeps a
# bounded or full key/value cache when decoding token by token.
DECODER_KINDS = ('full', 'local')


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  kind: str = 'full'
  radius: int = 128
  num_global: int = 16
  global_tokens: str = 'prefix'
  block_size: int = 64
  max_span: int = 256
  span_ramp: float = 32.0
  span_init: float = 0.5
  span_loss_coef: float = 2e-6
  implementation: str = 'auto'
  layer_pattern: tuple[str, ...] = ()
  decoder_kind: str = 'full'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  kind: str = 'lm'
  num_layers: int = 2
  num_decoder_layers: int = -1
  emb_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = -1
  head_dim: int = -1
  mlp_dim: int = 512
  mlp_activation: str = 'swiglu'
  vocab_size: int = 259
  max_len: int = 2048
  dropout_rate: float = 0.0
  tie_embeddings: bool = True
  positions: str = 'rope'
  rope_max_wavelength: float = 10_000.0
  t5_num_buckets: int = 32
  t5_max_distance: int = 128
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)

  # Resolved values -------------------------------------------------------
  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads == -1 else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.emb_dim // self.num_heads if self.head_dim == -1 else self.head_dim

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers == -1 else self.num_decoder_layers

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def layer_kinds(self, num_layers: Optional[int] = None) -> tuple[str, ...]:
    """Attention kind of each layer: the pattern repeated over depth."""
    n = self.num_layers if num_layers is None else num_layers
    pattern = self.attention.layer_pattern or (self.attention.kind,)
    return tuple(pattern[i % len(pattern)] for i in range(n))

  # Construction ----------------------------------------------------------
  @classmethod
  def from_config(cls, model_config) -> 'ModelConfig':
    """From an ml-collections `model` block (or a dict); validates."""
    raw = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    raw = dict(raw)
    att = dict(raw.pop('attention', {}))
    known = {f.name for f in dataclasses.fields(cls)}
    known_att = {f.name for f in dataclasses.fields(AttentionConfig)}
    unknown = [f'model.{k}' for k in raw if k not in known]
    unknown += [f'model.attention.{k}' for k in att if k not in known_att]
    if unknown:
      raise ValueError(f'Unknown model config field(s): {", ".join(sorted(unknown))}.')
    if 'layer_pattern' in att:
      pattern = att['layer_pattern']
      att['layer_pattern'] = tuple(pattern.split(',')) if isinstance(pattern, str) and pattern \
          else tuple(pattern or ())
    config = cls(**raw, attention=AttentionConfig(**att))
    config.validate()
    return config

  def validate(self):
    def fail(field, message):
      raise ValueError(f'model.{field}: {message}')

    if self.kind not in MODEL_KINDS:
      fail('kind', f'{self.kind!r} is not one of {MODEL_KINDS}.')
    for field in ('num_layers', 'emb_dim', 'num_heads', 'mlp_dim', 'vocab_size', 'max_len'):
      if getattr(self, field) < 1:
        fail(field, f'must be >= 1; got {getattr(self, field)}.')
    if self.kind == 'encoder_decoder' and self.decoder_layers < 1:
      fail('num_decoder_layers', f'must be >= 1 or -1; got {self.num_decoder_layers}.')
    if self.num_kv_heads != -1 and not 1 <= self.num_kv_heads <= self.num_heads:
      fail('num_kv_heads', f'must be in [1, num_heads={self.num_heads}] or -1; got '
           f'{self.num_kv_heads}.')
    if self.num_heads % self.kv_heads:
      fail('num_kv_heads', f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
           f'({self.kv_heads}).')
    if self.head_dim == -1 and self.emb_dim % self.num_heads:
      fail('head_dim', f'emb_dim ({self.emb_dim}) is not divisible by num_heads '
           f'({self.num_heads}); set model.head_dim explicitly.')
    if self.positions == 'rope' and self.dim_per_head % 2:
      fail('head_dim', f'RoPE rotates pairs of features; head_dim {self.dim_per_head} is odd.')
    if self.positions not in POSITIONS:
      fail('positions', f'{self.positions!r} is not one of {POSITIONS}.')
    if self.mlp_activation not in MLP_ACTIVATIONS:
      fail('mlp_activation', f'{self.mlp_activation!r} is not one of {MLP_ACTIVATIONS}.')
    if self.remat not in REMAT_POLICIES:
      fail('remat', f'{self.remat!r} is not one of {REMAT_POLICIES}.')
    for field in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        fail(field, f'{getattr(self, field)!r} is not a dtype name (e.g. bfloat16, float32).')
    if not 0.0 <= self.dropout_rate < 1.0:
      fail('dropout_rate', f'must be in [0, 1); got {self.dropout_rate}.')

    a = self.attention
    kinds = set(self.layer_kinds())
    if self.kind == 'encoder_decoder':
      kinds |= {a.decoder_kind}
    for kind in sorted(kinds):
      if kind not in attention.KINDS:
        field = 'attention.layer_pattern' if kind in a.layer_pattern else 'attention.kind'
        if kind == a.decoder_kind and self.kind == 'encoder_decoder':
          field = 'attention.decoder_kind'
        fail(field, f'unknown attention kind {kind!r}; valid kinds are: '
             f'{", ".join(attention.KINDS)}.')
    if self.kind == 'encoder_decoder' and a.decoder_kind not in DECODER_KINDS:
      fail('attention.decoder_kind', f'the decoder attends causally with a key/value cache; '
           f'use one of {DECODER_KINDS}, not {a.decoder_kind!r}.')
    uses = lambda param: any(param in attention.spec(k).params for k in kinds)
    if uses('radius') and a.radius < 1:
      fail('attention.radius', f'must be >= 1; got {a.radius}.')
    if a.global_tokens not in ('prefix', 'marked'):
      fail('attention.global_tokens', f"must be 'prefix' or 'marked'; got {a.global_tokens!r}.")
    if uses('num_global') and a.num_global < 0:
      fail('attention.num_global', f'must be >= 0; got {a.num_global}.')
    if uses('block_size') and a.block_size < 1:
      fail('attention.block_size', f'must be >= 1; got {a.block_size}.')
    if 'hierarchical' in kinds and (a.block_size < 2 or a.block_size % 2):
      fail('attention.block_size', f'hierarchical attention needs an even block_size >= 2; '
           f'got {a.block_size}.')
    if 'adaptive_span' in kinds:
      if a.max_span < 1:
        fail('attention.max_span', f'must be >= 1; got {a.max_span}.')
      if a.span_ramp <= 0:
        fail('attention.span_ramp', f'must be > 0; got {a.span_ramp}.')
      if not 0.0 <= a.span_init <= 1.0:
        fail('attention.span_init', f'is a fraction of max_span in [0, 1]; got {a.span_init}.')
    if a.implementation not in ('auto', 'xla', 'cudnn'):
      fail('attention.implementation', f"must be 'auto', 'xla' or 'cudnn'; got "
           f'{a.implementation!r}.')
    if a.implementation == 'cudnn' and kinds - {'full', 'local'}:
      fail('attention.implementation', f"'cudnn' computes only full and local attention; "
           f"layers use {sorted(kinds - {'full', 'local'})}. Use 'auto'.")
