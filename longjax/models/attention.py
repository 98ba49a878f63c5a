"""Attention layers: projections around a kernel chosen by name.

`SelfAttention` projects to queries, keys and values (grouped-query when
num_kv_heads < num_heads), applies rotary embeddings, and calls the kernel of
its kind's registry entry (`longjax.attention.spec(kind)`) with the settings
that entry names. It never knows how a kernel computes, nor compares kind
names: what a kind needs from the layer is in its entry (`learns_spans`: a
learnable span per head, as a fraction in [0, 1] of `max_span`, reported back
with the span penalty; `accepts_global_mask`: the task's marked tokens).

Decoding: `prefill` runs the kernel over prompts and returns the layer's
key/value cache (`longjax.models.cache`, laid out by the entry's
`cache_layout`); `decode_step` adds one token's key and value and attends the
cache with the entry's decode rule, exactly as the kernel would.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longjax import attention as kernels
from longjax import sharding
from longjax.attention import cached
from longjax.models import cache as kv_cache
from longjax.models import layers
from longjax.models.config import ModelConfig


class _Projections(nnx.Module):
  """Query, key, value and output weights shared by both attention layers."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    e, h, hk, d = config.emb_dim, config.num_heads, config.num_kv_heads, config.head_dim
    pd = config.param_dtype
    self.wq = layers.param(rngs, layers.normal(e ** -0.5), (e, h, d), ('embed', 'heads', 'kv'), pd)
    self.wk = layers.param(rngs, layers.normal(e ** -0.5), (e, hk, d),
                           ('embed', 'kv_heads', 'kv'), pd)
    self.wv = layers.param(rngs, layers.normal(e ** -0.5), (e, hk, d),
                           ('embed', 'kv_heads', 'kv'), pd)
    self.wo = layers.param(rngs, layers.normal((h * d) ** -0.5), (h, d, e),
                           ('heads', 'kv', 'embed'), pd)
    if config.qkv_bias:  # Qwen2's q/k/v biases
      zeros = jax.nn.initializers.zeros
      self.bq = layers.param(rngs, zeros, (h, d), ('heads', 'kv'), pd)
      self.bk = layers.param(rngs, zeros, (hk, d), ('kv_heads', 'kv'), pd)
      self.bv = layers.param(rngs, zeros, (hk, d), ('kv_heads', 'kv'), pd)

  def _w(self, p):
    return p[...].astype(self.config.dtype)

  def _rope_settings(self) -> tuple[float, str]:
    """(RoPE base, scaling) of this layer: windowed layers may have their own."""
    c = self.config
    if not self.spec.windowed:
      return c.rope_max_wavelength, c.rope_scaling
    base = c.rope_local_max_wavelength if c.rope_local_max_wavelength > 0 else c.rope_max_wavelength
    return base, c.rope_scaling if c.rope_scaling_local else 'none'

  def rope_frequencies(self, length: Optional[int] = None):
    """RoPE's frequency per feature pair, with the layer's base and scaling (a
    constant); length: what the model runs at, for dynamic NTK."""
    c = self.config
    base, scaling = self._rope_settings()
    return layers.rope_frequencies(
        c.head_dim, base, scaling=scaling, factor=c.rope_scaling_factor,
        low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
        original_max_len=c.rope_original_max_len, beta_fast=c.rope_beta_fast,
        beta_slow=c.rope_beta_slow, length=length)

  def _project(self, x, w, bias: str):
    """x [b, l, e] @ w [e, heads, d] (+ the projection's bias, model.qkv_bias)."""
    y = jnp.einsum('ble,ehd->blhd', x, self._w(w))
    return y + self._w(getattr(self, bias)) if self.config.qkv_bias else y

  def output(self, out):
    out = checkpoint_name(out, 'attention_out')
    y = jnp.einsum('blhd,hde->ble', out, self._w(self.wo))
    return sharding.constrain(y, ('batch', 'length', 'embed'))


class SelfAttention(_Projections):

  def __init__(self, config: ModelConfig, kind: str, *, causal: bool, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.kind = kind
    self.causal = causal
    if self.has_global_projections:
      # Longformer §3.1: global rows get their own projections Q_g, K_g, V_g.
      e, h, hk, d = config.emb_dim, config.num_heads, config.num_kv_heads, config.head_dim
      pd = config.param_dtype
      self.wq_global = layers.param(rngs, layers.normal(e ** -0.5), (e, h, d),
                                    ('embed', 'heads', 'kv'), pd)
      self.wk_global = layers.param(rngs, layers.normal(e ** -0.5), (e, hk, d),
                                    ('embed', 'kv_heads', 'kv'), pd)
      self.wv_global = layers.param(rngs, layers.normal(e ** -0.5), (e, hk, d),
                                    ('embed', 'kv_heads', 'kv'), pd)
    if self.spec.summary_layout is not None:
      # LongT5's global_input_layer_norm: a learned RMS norm of each block's
      # summed inputs, before the layer's own k/v projections.
      self.summary_norm = layers.RMSNorm(config.emb_dim, dtype=config.dtype, eps=config.norm_eps,
                                         param_dtype=config.param_dtype, rngs=rngs)
    if self.spec.learns_spans:
      # A fraction of max_span per head, kept in [0, 1] by the optimizer (spans()).
      init = jax.nn.initializers.constant(config.attention.span_init)
      self.span_fraction = layers.param(rngs, init, (config.num_heads,), ('heads',),
                                        jnp.float32)

  @property
  def spec(self) -> kernels.KindSpec:
    """The registry entry of this layer's attention kind."""
    return kernels.spec(self.kind)

  def spans(self):
    """Span of each head in tokens (kinds that learn spans): fraction * max_span.

    Not clipped here: as in Sukhbaatar et al. (facebookresearch/adaptive-span,
    `AdaptiveMask.clamp_param` after each `optimizer.step()`), the optimizer
    keeps the parameter in [0, 1] (`longjax.train.optimizer.clamp_spans`), so a
    head whose span sits at 0 or at max_span still gets a gradient and can move
    back. A clip in the forward pass would freeze such a head for good.
    """
    return self.span_fraction[...] * self.config.attention.max_span

  @property
  def has_global_projections(self) -> bool:
    return self.spec.global_projections and self.config.attention.global_projections

  def project(self, x, positions, *, global_rows: bool = False, length: Optional[int] = None):
    """Queries, keys and values [b, l, heads, d] (RoPE applied); global_rows:
    those of the separate global projections.

    length: the sequence length the model runs at, for a length-dependent RoPE
    (dynamic NTK): by default l, as transformers' max(position) + 1 over a
    whole row; decoding passes the cache's length (prompt and generation), so
    that the prompt's cached keys and every generated token share one set of
    frequencies (transformers instead recomputes them as the generation grows,
    leaving the cached keys rotated with the older ones).
    """
    wq, wk, wv = ((self.wq_global, self.wk_global, self.wv_global) if global_rows
                  else (self.wq, self.wk, self.wv))
    if global_rows:  # Longformer's global projections have no biases
      q, k, v = (jnp.einsum('ble,ehd->blhd', x, self._w(w)) for w in (wq, wk, wv))
    else:
      q, k, v = (self._project(x, w, b) for w, b in ((wq, 'bq'), (wk, 'bk'), (wv, 'bv')))
    if self.config.positions == 'rope':
      inv_freq = self.rope_frequencies(length or positions.shape[1])
      q = layers.apply_rope(q, positions, inv_freq)
      k = layers.apply_rope(k, positions, inv_freq)
      c = self.config
      temperature = layers.rope_attention_factor(self._rope_settings()[1], c.rope_scaling_factor,
                                                 c.rope_attention_factor)
      if temperature != 1.0:  # YaRN: both rotated by its factor, as HF scales cos and sin
        q, k = (x * jnp.asarray(temperature, x.dtype) for x in (q, k))
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'kv'))
    k = sharding.constrain(k, ('batch', 'length', 'kv_heads', 'kv'))
    v = sharding.constrain(v, ('batch', 'length', 'kv_heads', 'kv'))
    return q, k, v

  def summary_kv(self, sums):
    """Summary keys and values [..., kv_heads, d] of summed inputs [..., emb].

    LongT5 TGlobal (Guo et al. 2022, §3.1.2): k = W_k RMSNorm_g(sum x),
    v = W_v RMSNorm_g(sum x), the layer's own projections, no rotary embedding.
    """
    s = self.summary_norm(sums)
    return (jnp.einsum('...e,ehd->...hd', s, self._w(self.wk)),
            jnp.einsum('...e,ehd->...hd', s, self._w(self.wv)))

  def summaries(self, x, segment_ids):
    """Keys and values [b, G, kv_heads, d] of the summaries of x [b, l, emb]'s
    blocks, slot by slot as the kind's summary_layout numbers them."""
    b, l, e = x.shape
    layout = self.spec.summary_layout(segment_ids, batch=b, length=l,
                                      summary_block=self.config.attention.summary_block,
                                      causal=self.causal)
    slots = layout.valid.shape[1]
    target = jnp.where(layout.token_summary >= 0, layout.token_summary, slots)
    sums = kernels.scatter_rows(target, x.astype(jnp.float32), slots, add=True)
    return self.summary_kv(sums)

  def _uses_marked_globals(self) -> bool:
    return self.spec.accepts_global_mask and self.config.attention.global_tokens == 'marked'

  def _attend(self, x, positions, q, k, v, *, segment_ids, global_mask, bias_fn,
              summary_bias_fn, length: Optional[int] = None):
    """The kernel over q, k, v of inputs x: (out [b, l, heads, d], aux with the span
    penalty, extra: what the layer formed for the kernel — summaries, global q/k/v;
    length: as in `project`)."""
    spec = self.spec
    settings = spec.settings(self.config.attention)
    aux, extra = {}, {}
    if spec.learns_spans:
      extra['spans'] = self.spans()
      aux['span'] = kernels.span_penalty(extra['spans'])
    if self._uses_marked_globals():
      if global_mask is None:
        raise ValueError("model.attention.global_tokens = 'marked' needs the batch's "
                         "global_mask (the synthetic tasks give one); use 'prefix' for text.")
      extra['global_mask'] = global_mask.astype(bool)
    functions = {}
    if self.has_global_projections:
      extra['global_qkv'] = self.project(x, positions, global_rows=True, length=length)
    if spec.summary_layout is not None:
      extra['summary_k'], extra['summary_v'] = self.summaries(x, segment_ids)
      functions['summary_bias_fn'] = summary_bias_fn

    def kernel(q, k, v, segment_ids, extra):
      return spec.fn(q, k, v, causal=self.causal, segment_ids=segment_ids, bias_fn=bias_fn,
                     implementation=self.config.attention.implementation, **settings, **extra,
                     **functions)

    if self.config.remat == 'attention':
      # Keep only q, k, v (and the output) for the backward pass: the score
      # tiles, O(length x window) per head, are recomputed instead of stored.
      kernel = jax.checkpoint(kernel, policy=jax.checkpoint_policies.nothing_saveable)
    return kernel(q, k, v, segment_ids, extra), aux, extra

  def __call__(self, x, *, positions, segment_ids=None, global_mask=None, bias_fn=None,
               summary_bias_fn=None):
    """x [b, l, emb] -> ([b, l, emb], aux) with aux holding the mean span if adaptive.

    global_mask [b, l]: the task's global tokens, for kinds that accept them
    with model.attention.global_tokens = 'marked' (ignored otherwise).
    bias_fn: the token position bias; summary_bias_fn: the summaries' (TGlobal).
    """
    q, k, v = self.project(x, positions)
    out, aux, _ = self._attend(x, positions, q, k, v, segment_ids=segment_ids,
                               global_mask=global_mask, bias_fn=bias_fn,
                               summary_bias_fn=summary_bias_fn)
    return self.output(out), aux

  # Decoding ---------------------------------------------------------------
  def cache_layout(self, max_length: int) -> kernels.CacheLayout:
    """Layout of this layer's decoding cache for positions 0..max_length-1."""
    if not self.causal:
      raise ValueError('Only causal self-attention decodes with a cache.')
    if max_length < 1:
      raise ValueError(f'cache max_length must be >= 1; got {max_length}.')
    if self._uses_marked_globals():
      raise ValueError(
          f"Decoding {self.kind} pins the first num_global positions (attention sinks); a "
          "model trained with model.attention.global_tokens = 'marked' would need every "
          "earlier key for each marked token. Evaluate it teacher-forced (--mode=eval) "
          "instead.")
    layout = self.spec.cache_layout(self.spec.settings(self.config.attention), max_length)
    if self.has_global_projections:
      layout = layout._replace(global_slots=layout.pinned)
    return layout

  def init_cache(self, batch: int, max_length: int,
                 cache_dtype: str = 'auto') -> kv_cache.LayerCache:
    """An empty cache for positions 0..max_length-1 (cache_dtype: 'auto' or 'int8')."""
    return kv_cache.init(self.cache_layout(max_length), batch, self.config.num_kv_heads,
                         self.config.head_dim, self.config.dtype, emb_dim=self.config.emb_dim,
                         heads=self.config.num_heads, cache_dtype=cache_dtype
                         ).replace(length=max_length)

  def prefill(self, x, *, positions, lengths, max_length: int, bias_fn=None,
              summary_bias_fn=None, cache_dtype: str = 'auto'):
    """The forward over prompts (the blocked kernel, as __call__) and the cache it leaves.

    x [b, l, emb] right-padded prompts at positions [b, l], lengths [b] their
    real lengths -> ([b, l, emb], LayerCache for positions up to max_length - 1).
    """
    layout = self.cache_layout(max_length)
    q, k, v = self.project(x, positions, length=max_length)
    out, _, formed = self._attend(x, positions, q, k, v, segment_ids=None, global_mask=None,
                                  bias_fn=bias_fn, summary_bias_fn=summary_bias_fn,
                                  length=max_length)
    # The cache takes what the kernel was given, not a second computation of it.
    summaries = global_kv = None
    if 'summary_k' in formed:
      summaries = (formed['summary_k'], formed['summary_v'], x)
    if 'global_qkv' in formed:
      global_kv = formed['global_qkv'][1:]
    cache = kv_cache.from_prompt(layout, k, v, lengths, summaries=summaries, global_kv=global_kv,
                                 queries=q, cache_dtype=cache_dtype)
    return self.output(out), cache.replace(length=max_length)

  def decode_step(self, x, *, positions, cache: kv_cache.LayerCache, bias_fn=None,
                  summary_bias_fn=None):
    """One token per row: x [b, 1, emb] at positions [b] -> ([b, 1, emb], new cache).

    Equals the row of __call__ at that position over the same tokens.
    """
    q, k, v = self.project(x, positions[:, None], length=cache.length)
    summarize = self.summary_kv if self.spec.summary_layout is not None else None
    global_q = global_kv = None
    if self.has_global_projections:
      global_q, k_g, v_g = self.project(x, positions[:, None], global_rows=True,
                                        length=cache.length)
      global_kv = (k_g[:, 0], v_g[:, 0])
    cache = kv_cache.append(cache, k[:, 0], v[:, 0], positions, x=x[:, 0], summarize=summarize,
                            global_kv=global_kv, q=q[:, 0])
    extra = {'spans': self.spans()} if self.spec.learns_spans else {}
    if self.spec.summary_layout is not None:
      extra['summary_bias_fn'] = summary_bias_fn
    out = kv_cache.attend(cache, q[:, 0], positions, kind=self.spec,
                          settings=self.spec.settings(self.config.attention), bias_fn=bias_fn,
                          **extra)
    if global_q is not None:  # a query that is a global token: its own projections
      g = cache.global_kv
      groups, is_global = self.spec.decode_global_keys(
          self.spec.settings(self.config.attention), g.heads(), positions)
      out = jnp.where(is_global[:, None, None],
                      cached.attend(global_q[:, 0], groups, bias_fn=bias_fn), out)
    return self.output(out[:, None]), cache


class CrossAttention(_Projections):
  """Decoder queries attend the encoder output (full attention, no positions)."""

  def project_memory(self, encoded):
    """Keys and values of the encoder output, [b, source_len, kv_heads, d]."""
    k = self._project(encoded, self.wk, 'bk')
    v = self._project(encoded, self.wv, 'bv')
    return (sharding.constrain(k, ('batch', 'kv_length', 'kv_heads', 'kv')),
            sharding.constrain(v, ('batch', 'kv_length', 'kv_heads', 'kv')))

  def __call__(self, x, memory, *, segment_ids, memory_segment_ids):
    """x [b, t, emb]; memory = project_memory(encoded); segment ids match queries to keys."""
    q = self._project(x, self.wq, 'bq')
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'kv'))
    k, v = memory
    # Cross-attention is full attention whatever the self-attention kind: an
    # implementation chosen for that kind applies here only if it computes this.
    implementation = self.config.attention.implementation
    if implementation in ('cudnn', 'splash'):  # neither takes cross-attention segments
      implementation = 'auto'
    out = kernels.dot_product(q, k, v, segment_ids=segment_ids,
                              kv_segment_ids=memory_segment_ids, implementation=implementation)
    return self.output(out)
