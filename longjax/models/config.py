"""The model's settings: one definition of every `model.*` field, its default and its meaning.

`longjax/configs/base.py` builds its `model` block from `defaults()` here, so each
default is written once. `ModelConfig.from_config(config.model)` turns the
ml-collections block into a frozen dataclass at the boundary: it rejects
unknown fields, maps the deprecated spellings (with a warning), validates
every combination (the field and the fix named, before anything is traced
or compiled) and resolves the sentinels (`-1` = derived), so the model code
reads typed, final values: `num_kv_heads`, `head_dim`, `num_decoder_layers`
are ints, `dtype` and `param_dtype` are `jnp.dtype`s.

What an attention kind reads is the kind's own business: `attention.spec(kind)`
names its settings (`params`, the fields of `AttentionConfig` below) and checks them.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Optional

import jax.numpy as jnp

from longjax import attention

POSITIONS = ('rope', 't5_bias', 'learned')
ROPE_SCALINGS = ('none', 'linear', 'llama3', 'yarn', 'dynamic')
# model.tile_tokens = -1: the default tiling. Untiled, the MLP's hidden
# activations (3 x mlp_dim per token) and the fp32 logits are among the
# largest arrays of a long step; 4k-token tiles bound them at a few MB
# (BENCHMARKS.md, "Memory of one step"; their cost in speed is not measured yet).
AUTO_TILE_FROM = 16384
AUTO_TILE_TOKENS = 4096
REMAT_POLICIES = ('none', 'attention', 'dots', 'attention_out', 'full')
MLP_ACTIVATIONS = ('swiglu', 'geglu', 'gelu', 'relu')
ARCHS = ('lm', 'encoder_decoder')
GLOBAL_TOKENS = ('prefix', 'marked')
# The "split, attend, concatenate" kind: with learned positions, a stack whose
# every layer is chunked embeds positions modulo chunk_size (transformer.py).
CHUNKED = 'chunked'

# Old spellings, accepted for one release with a warning: field -> its
# "unset" value in the config. model.kind became model.arch (`kind` is the
# attention kind); attention.block_size meant three things and became
# summary_block (transient_global), level0_block (hierarchical) and
# chunk_size (chunked); setting it sets all three.
DEPRECATED_MODEL_FIELDS = {'kind': ''}
DEPRECATED_ATTENTION_FIELDS = {'block_size': -1}
_BLOCK_SIZE_FIELDS = ('summary_block', 'level0_block', 'chunk_size')


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  kind: str = attention.DEFAULT_KIND  # One of longjax.attention.KINDS ('full' by default).
  radius: int = 128  # Window: query i sees keys j with |i - j| <= radius (local kinds).
  num_global: int = 16  # global_local: global tokens per document (its first, or its marked ones).
  global_tokens: str = 'prefix'  # 'prefix' (each document's first num_global) or 'marked' (the batch's).
  global_projections: bool = True  # global_local: separate Q_g, K_g, V_g for global rows (Longformer).
  summary_block: int = 64  # transient_global: tokens per summary block.
  level0_block: int = 64  # hierarchical: level-0 block b (even); level l pools 2^l tokens.
  chunk_size: int = 64  # chunked: tokens per independent chunk.
  max_span: int = 256  # adaptive_span: longest span a head may learn.
  span_ramp: float = 32.0  # adaptive_span: width R of the soft mask ramp.
  span_init: float = 0.0  # adaptive_span: initial span as a fraction of max_span (paper: 0).
  span_loss_coef: float = 2e-6  # adaptive_span: weight of the mean-span penalty in the loss.
  implementation: str = 'auto'  # 'auto', 'xla', 'cudnn', 'splash' (TPU), 'pallas_gpu' (kinds that list it).
  layer_pattern: tuple[str, ...] = ()  # Per-layer kinds repeated over depth, e.g. local,local,full.
  decoder_kind: str = attention.DEFAULT_KIND  # encoder_decoder: the decoder's causal kind.


PEFT_METHODS = ('none', 'lora')


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning (longjax/models/peft.py, through Qwix)."""
  method: str = 'none'  # 'none', or 'lora' (Hu et al. 2021): train rank-r adapters only.
  rank: int = 8  # LoRA rank r.
  alpha: float = 16.0  # LoRA scale: the adapter adds (alpha / rank) x A B.
  # Module paths that get adapters (a regex, fully matched against paths such as
  # decoder/blocks/0/attention): every attention and MLP projection.
  targets: str = r'.*(attention|mlp)'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  arch: str = 'lm'  # 'lm' (decoder-only) or 'encoder_decoder'.
  num_layers: int = 2  # Transformer blocks (each of encoder and decoder).
  num_decoder_layers: int = -1  # Decoder blocks of an encoder-decoder; -1 = num_layers.
  emb_dim: int = 128  # Residual stream width.
  num_heads: int = 4  # Query heads.
  num_kv_heads: int = -1  # Key/value heads (grouped-query attention); -1 = num_heads.
  head_dim: int = -1  # Per-head width; -1 = emb_dim // num_heads.
  mlp_dim: int = 512  # Hidden width of the MLP.
  mlp_activation: str = 'swiglu'  # 'swiglu', 'geglu' (gated, 3 matrices), 'gelu', 'relu' (2).
  vocab_size: int = 259  # Byte tokenizer: 256 bytes + pad, eos, bos (set by the tokenizer).
  max_len: int = 2048  # Longest sequence the model accepts (inputs are checked against it).
  dropout_rate: float = 0.0  # Dropout on the residual branches while training.
  tie_embeddings: bool = True  # Share the input embedding with the output projection.
  positions: str = 'rope'  # 'rope', 't5_bias' (T5 relative buckets) or 'learned'.
  rope_max_wavelength: float = 10_000.0  # RoPE base.
  # RoPE frequency scaling for context extension (layers.rope_frequencies):
  # 'none'; 'linear' (position interpolation, Chen et al. 2023: positions / factor);
  # 'llama3' (Llama 3.1: long wavelengths / factor, short kept, a smooth band between);
  # 'yarn' (Peng et al. 2023: interpolation ramped over dimensions, attention temperature);
  # 'dynamic' (dynamic NTK: the base grows with the length run, beyond rope_original_max_len).
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0  # 'linear', 'llama3', 'yarn', 'dynamic': the extension factor.
  rope_low_freq_factor: float = 1.0  # 'llama3': wavelengths beyond original_max_len / this are scaled.
  rope_high_freq_factor: float = 4.0  # 'llama3': wavelengths below original_max_len / this are kept.
  rope_original_max_len: int = 8192  # 'llama3', 'yarn', 'dynamic': the pretrained context length.
  rope_beta_fast: float = 32.0  # 'yarn': rotations below which dimensions are interpolated.
  rope_beta_slow: float = 1.0  # 'yarn': rotations above which dimensions are kept.
  rope_attention_factor: float = -1.0  # 'yarn': q and k multiplier; -1 = 0.1 ln(factor) + 1.
  # Windowed layers (local, chunked, adaptive_span) may differ (Gemma 3's local layers):
  rope_local_max_wavelength: float = -1.0  # their RoPE base; -1 = rope_max_wavelength.
  rope_scaling_local: bool = True  # False: rope_scaling applies to the other layers only.
  norm_eps: float = 1e-6  # RMSNorm epsilon (HF's rms_norm_eps).
  # Divide the tied readout by sqrt(emb_dim) (T5, and longjax's unit-variance
  # embeddings); False: plain x E^T, as Llama / Qwen2 checkpoints with tied embeddings.
  scale_tied_logits: bool = True
  qkv_bias: bool = False  # Biases on the query/key/value projections (Qwen2).
  # Cross-layer sharing (ALBERT): each k consecutive layers of a stack use one block's
  # weights (1 = none); their attention kinds must agree.
  share_layers: int = 1
  t5_num_buckets: int = 32  # Relative-position buckets for 't5_bias'.
  t5_max_distance: int = 128  # Distances beyond this share the last bucket.
  dtype: Any = 'bfloat16'  # Compute dtype of matmuls (softmax, norms, logits stay fp32).
  param_dtype: Any = 'float32'  # Master weights.
  remat: str = 'none'  # 'none', 'attention' (kernel only), 'dots', 'attention_out', 'full'.
  # Tokens per tile of the MLP and of the LM head and loss (layers.map_tokens):
  # 0 = untiled; -1 = AUTO_TILE_TOKENS-token tiles for sequences longer than
  # AUTO_TILE_FROM, untiled below.
  tile_tokens: int = -1
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)

  def __post_init__(self):
    """Validates, then resolves the sentinels: every instance holds final values."""
    self.validate()
    resolved = dict(
        num_kv_heads=self.num_heads if self.num_kv_heads == -1 else self.num_kv_heads,
        head_dim=self.emb_dim // self.num_heads if self.head_dim == -1 else self.head_dim,
        num_decoder_layers=(self.num_layers if self.num_decoder_layers == -1
                            else self.num_decoder_layers),
        dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    for field, value in resolved.items():
      object.__setattr__(self, field, value)

  def token_tiles(self, length: int) -> int:
    return token_tiles(length, self.tile_tokens)

  def layer_kinds(self, num_layers: Optional[int] = None) -> tuple[str, ...]:
    """Attention kind of each layer: the pattern repeated over depth."""
    n = self.num_layers if num_layers is None else num_layers
    pattern = self.attention.layer_pattern or (self.attention.kind,)
    return tuple(pattern[i % len(pattern)] for i in range(n))

  def attention_kinds(self) -> frozenset[str]:
    """Every attention kind some layer of the model uses."""
    kinds = set(self.layer_kinds())
    if self.arch == 'encoder_decoder':
      kinds.add(self.attention.decoder_kind)
    return frozenset(kinds)

  # Construction ----------------------------------------------------------
  @classmethod
  def from_config(cls, model_config) -> 'ModelConfig':
    """From an ml-collections `model` block (or a dict); validates and resolves."""
    raw = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    raw = dict(raw)
    att = dict(raw.pop('attention', {}) or {})
    peft = dict(raw.pop('peft', {}) or {})
    _apply_deprecated(raw, att)
    known = {f.name for f in dataclasses.fields(cls)}
    known_att = {f.name for f in dataclasses.fields(AttentionConfig)}
    known_peft = {f.name for f in dataclasses.fields(PeftConfig)}
    unknown = [f'model.{k}' for k in raw if k not in known]
    unknown += [f'model.attention.{k}' for k in att if k not in known_att]
    unknown += [f'model.peft.{k}' for k in peft if k not in known_peft]
    if unknown:
      raise ValueError(f'Unknown model config field(s): {", ".join(sorted(unknown))}.')
    if 'layer_pattern' in att:
      att['layer_pattern'] = parse_layer_pattern(att['layer_pattern'])
    return cls(**raw, attention=AttentionConfig(**att), peft=PeftConfig(**peft))

  def validate(self):
    def fail(field, message):
      raise ValueError(f'model.{field}: {message}')

    if self.arch not in ARCHS:
      fail('arch', f'{self.arch!r} is not one of {ARCHS}.')
    for field in ('num_layers', 'emb_dim', 'num_heads', 'mlp_dim', 'vocab_size', 'max_len'):
      if getattr(self, field) < 1:
        fail(field, f'must be >= 1; got {getattr(self, field)}.')
    if self.arch == 'encoder_decoder' and not (self.num_decoder_layers >= 1
                                                or self.num_decoder_layers == -1):
      fail('num_decoder_layers', f'must be >= 1 or -1; got {self.num_decoder_layers}.')
    if self.num_kv_heads != -1 and not 1 <= self.num_kv_heads <= self.num_heads:
      fail('num_kv_heads', f'must be in [1, num_heads={self.num_heads}] or -1; got '
           f'{self.num_kv_heads}.')
    kv_heads = self.num_heads if self.num_kv_heads == -1 else self.num_kv_heads
    if self.num_heads % kv_heads:
      fail('num_kv_heads', f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
           f'({kv_heads}).')
    if self.head_dim == -1 and self.emb_dim % self.num_heads:
      fail('head_dim', f'emb_dim ({self.emb_dim}) is not divisible by num_heads '
           f'({self.num_heads}); set model.head_dim explicitly.')
    head_dim = self.emb_dim // self.num_heads if self.head_dim == -1 else self.head_dim
    if self.positions == 'rope' and head_dim % 2:
      fail('head_dim', f'RoPE rotates pairs of features; head_dim {head_dim} is odd.')
    if self.positions not in POSITIONS:
      fail('positions', f'{self.positions!r} is not one of {POSITIONS}.')
    if self.rope_scaling not in ROPE_SCALINGS:
      fail('rope_scaling', f'{self.rope_scaling!r} is not one of {ROPE_SCALINGS}.')
    if self.rope_scaling != 'none' and not self.rope_scaling_factor >= 1.0:
      fail('rope_scaling_factor', f'must be >= 1 (the context extension); got '
           f'{self.rope_scaling_factor}.')
    if self.rope_scaling == 'llama3' and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      fail('rope_low_freq_factor', f'llama3 scaling needs 0 < rope_low_freq_factor < '
           f'rope_high_freq_factor; got {self.rope_low_freq_factor}, '
           f'{self.rope_high_freq_factor}.')
    if self.rope_scaling in ('llama3', 'yarn', 'dynamic') and self.rope_original_max_len < 1:
      fail('rope_original_max_len', f'{self.rope_scaling} scaling needs the pretrained length '
           f'(>= 1); got {self.rope_original_max_len}.')
    if isinstance(self.share_layers, bool) or not isinstance(self.share_layers, int) or (
        self.share_layers < 1):
      fail('share_layers', f'must be an int >= 1 (1: no sharing); got {self.share_layers!r}.')
    if not (self.rope_local_max_wavelength > 0 or self.rope_local_max_wavelength == -1):
      fail('rope_local_max_wavelength', f'must be > 0, or -1 (rope_max_wavelength); got '
           f'{self.rope_local_max_wavelength}.')
    if not self.norm_eps > 0:
      fail('norm_eps', f'must be > 0; got {self.norm_eps}.')
    if self.mlp_activation not in MLP_ACTIVATIONS:
      fail('mlp_activation', f'{self.mlp_activation!r} is not one of {MLP_ACTIVATIONS}.')
    if self.tile_tokens < -1:
      fail('tile_tokens', f'must be >= 0 (0: untiled) or -1 (automatic); got {self.tile_tokens}.')
    if self.remat not in REMAT_POLICIES:
      fail('remat', f'{self.remat!r} is not one of {REMAT_POLICIES}.')
    for field in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        fail(field, f'{getattr(self, field)!r} is not a dtype name (e.g. bfloat16, float32).')
    if not 0.0 <= self.dropout_rate < 1.0:
      fail('dropout_rate', f'must be in [0, 1); got {self.dropout_rate}.')
    self._validate_attention(fail)
    self._validate_peft(fail)

  def _validate_peft(self, fail):
    p = self.peft
    if p.method not in PEFT_METHODS:
      fail('peft.method', f'{p.method!r} is not one of {PEFT_METHODS}.')
    if p.method == 'none':
      return
    if isinstance(p.rank, bool) or not isinstance(p.rank, int) or p.rank < 1:
      fail('peft.rank', f'must be an int >= 1; got {p.rank!r}.')
    if not p.alpha > 0:
      fail('peft.alpha', f'must be > 0; got {p.alpha!r}.')
    try:
      re.compile(p.targets)
    except re.error as error:
      fail('peft.targets', f'{p.targets!r} is not a regular expression: {error}.')

  def _validate_attention(self, fail):
    a = self.attention
    kinds = self.attention_kinds()
    for kind in sorted(kinds):
      if kind not in attention.KINDS:
        field = 'attention.layer_pattern' if kind in a.layer_pattern else 'attention.kind'
        if kind == a.decoder_kind and self.arch == 'encoder_decoder':
          field = 'attention.decoder_kind'
        fail(field, f'unknown attention kind {kind!r}; valid kinds are: '
             f'{", ".join(attention.KINDS)}.')
    if a.global_tokens not in GLOBAL_TOKENS:
      fail('attention.global_tokens', f"must be 'prefix' or 'marked'; got {a.global_tokens!r}.")
    if not isinstance(a.global_projections, bool):
      fail('attention.global_projections', f'must be True or False; got {a.global_projections!r}.')
    specs = [attention.spec(kind) for kind in sorted(kinds)]
    for spec in specs:
      for param, problem in spec.problems(spec.settings(a)).items():
        fail(f'attention.{param}', f'{problem} ({spec.name} attention)')
    if any(spec.learns_spans for spec in specs) and not 0.0 <= a.span_init <= 1.0:
      fail('attention.span_init', f'is a fraction of max_span in [0, 1]; got {a.span_init}.')
    kinds = self.layer_kinds()
    k = self.share_layers if isinstance(self.share_layers, int) and self.share_layers > 0 else 1
    for i, kind in enumerate(kinds):
      if kind != kinds[i // k * k]:
        fail('share_layers', f'layers {i // k * k} and {i} share weights (share_layers={k}) '
             f'but their kinds differ ({kinds[i // k * k]}, {kind}); choose a layer_pattern '
             'whose period is a multiple of share_layers, or share_layers = 1.')
    layer_kinds = set(kinds)
    if self.positions == 'learned' and CHUNKED in layer_kinds and len(layer_kinds) > 1:
      fail('positions', f"'learned' adds one position table at the input, so chunked "
           f'layers cannot restart positions in each chunk when model.attention.layer_pattern '
           f'mixes them with other kinds ({", ".join(sorted(layer_kinds))}); use '
           f"model.positions = 'rope' or 't5_bias', or make every layer chunked.")
    choices = attention.implementations.IMPLEMENTATIONS
    if a.implementation not in choices:
      fail('attention.implementation', f"must be one of {', '.join(map(repr, choices))}; got "
           f'{a.implementation!r}.')
    if a.implementation in ('cudnn', 'splash', 'pallas_gpu') and self.positions == 't5_bias':
      fail('attention.implementation', f"{a.implementation!r} has no position-bias input, "
           "and model.positions = 't5_bias' adds one to every layer; use 'auto' (which "
           "takes the XLA kernels for such layers) or model.positions = 'rope'.")
    lacking = sorted(s.name for s in specs if a.implementation != 'auto'
                     and a.implementation not in s.implementations)
    if lacking:
      fail('attention.implementation', f'{a.implementation!r} does not compute '
           f"{', '.join(lacking)} attention. Use 'auto'.")


def token_tiles(length: int, tile_tokens: int) -> int:
  """How many tiles `layers.map_tokens` splits `length` tokens into (1 = untiled):
  the fewest that divide the length with at most tile_tokens tokens each
  (model.tile_tokens; -1: AUTO_TILE_TOKENS beyond AUTO_TILE_FROM)."""
  if tile_tokens == -1:
    tile_tokens = AUTO_TILE_TOKENS if length > AUTO_TILE_FROM else 0
  if tile_tokens == 0 or length <= tile_tokens:
    return 1
  tiles = -(-length // tile_tokens)
  while length % tiles:
    tiles += 1
  return tiles


def parse_layer_pattern(pattern) -> tuple[str, ...]:
  """'local,local,full', ('local', 'full') or ('local,local,full',) -> a tuple of kinds.

  The last is what `--config.model.attention.layer_pattern=local,local,full`
  gives (ml-collections reads a tuple flag it cannot literal_eval as one string).
  """
  items = (pattern,) if isinstance(pattern, str) else tuple(pattern or ())
  return tuple(word.strip() for item in items for word in str(item).split(',') if word.strip())


def defaults() -> dict:
  """The `model` block's fields and defaults as a nested dict (for longjax/configs/base.py).

  Includes the deprecated spellings at their "unset" value, so that old
  command lines still parse (with a warning).
  """
  model = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != 'attention'}
  model['attention'] = dataclasses.asdict(AttentionConfig())
  model['peft'] = dataclasses.asdict(PeftConfig())
  model.update(DEPRECATED_MODEL_FIELDS)
  model['attention'].update(DEPRECATED_ATTENTION_FIELDS)
  return model


def upgraded(model_block: dict) -> dict:
  """A `model` block (a plain dict, e.g. from an older run's config.json) with the
  deprecated spellings mapped onto their new fields."""
  model = dict(model_block)
  model['attention'] = dict(model.get('attention', {}) or {})
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)
    _apply_deprecated(model, model['attention'])
  return model


def _apply_deprecated(raw: dict, att: dict) -> None:
  """Maps the deprecated spellings onto their new fields, in place, with a warning."""
  kind = raw.pop('kind', DEPRECATED_MODEL_FIELDS['kind'])
  if kind != DEPRECATED_MODEL_FIELDS['kind']:
    warnings.warn("model.kind is deprecated: use model.arch ('lm' or 'encoder_decoder').",
                  FutureWarning, stacklevel=3)
    raw.setdefault('arch', kind)
    if raw['arch'] == ModelConfig.arch:  # Only the default: the old spelling wins.
      raw['arch'] = kind
  block_size = att.pop('block_size', DEPRECATED_ATTENTION_FIELDS['block_size'])
  if block_size != DEPRECATED_ATTENTION_FIELDS['block_size']:
    warnings.warn('model.attention.block_size is deprecated: use summary_block '
                  '(transient_global), level0_block (hierarchical) or chunk_size (chunked); '
                  'it sets all three.', FutureWarning, stacklevel=3)
    for field in _BLOCK_SIZE_FIELDS:
      att[field] = block_size
