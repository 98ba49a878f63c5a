"""Attention layers: projections around a kernel chosen by name.

`SelfAttention` projects to queries, keys and values (grouped-query when
num_kv_heads < num_heads), applies rotary embeddings, and calls the kernel
`longjax.attention.get(kind)` with the kind's settings. It never knows how a
kernel computes; adding a kind to the registry makes it available here.

Adaptive span keeps its learnable span per head here: a fraction in [0, 1]
of `max_span` per head, reported back (mean span and the span penalty) so the
trainer can add the penalty to the loss.

Decoding: `prefill` runs the kernel over prompts and returns the layer's
key/value cache (`longjax.models.cache`); `decode_step` adds one token's key
and value and attends its cache exactly as the kernel would.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longjax import attention as kernels
from longjax import sharding
from longjax.models import cache as kv_cache
from longjax.models import layers
from longjax.models.config import ModelConfig


def kernel_kwargs(config: ModelConfig, kind: str) -> dict:
  """The registered kernel's settings from the config (all but adaptive spans)."""
  a = config.attention
  settings = dict(radius=a.radius, num_global=a.num_global, block_size=a.block_size,
                  max_span=a.max_span, ramp=a.span_ramp)
  kwargs = {p: settings[p] for p in kernels.spec(kind).params if p in settings}
  if kind in ('full', 'local'):
    kwargs['implementation'] = a.implementation
  return kwargs


class _Projections(nnx.Module):
  """Query, key, value and output weights shared by both attention layers."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    e, h, hk, d = config.emb_dim, config.num_heads, config.kv_heads, config.dim_per_head
    pd = config.weight_dtype
    self.wq = layers.param(rngs, layers.normal(e ** -0.5), (e, h, d), ('embed', 'heads', 'kv'), pd)
    self.wk = layers.param(rngs, layers.normal(e ** -0.5), (e, hk, d),
                           ('embed', 'kv_heads', 'kv'), pd)
    self.wv = layers.param(rngs, layers.normal(e ** -0.5), (e, hk, d),
                           ('embed', 'kv_heads', 'kv'), pd)
    self.wo = layers.param(rngs, layers.normal((h * d) ** -0.5), (h, d, e),
                           ('heads', 'kv', 'embed'), pd)

  def _w(self, p):
    return p[...].astype(self.config.compute_dtype)

  def output(self, out):
    out = checkpoint_name(out, 'attention_out')
    y = jnp.einsum('blhd,hde->ble', out, self._w(self.wo))
    return sharding.constrain(y, ('batch', 'length', 'embed'))


class SelfAttention(_Projections):

  def __init__(self, config: ModelConfig, kind: str, *, causal: bool, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.kind = kind
    self.causal = causal
    if kind == 'adaptive_span':
      init = jax.nn.initializers.constant(config.attention.span_init)
      self.span_fraction = layers.param(rngs, init, (config.num_heads,), ('heads',),
                                        jnp.float32)

  def spans(self):
    """Span of each head in tokens (adaptive_span only)."""
    fraction = jnp.clip(self.span_fraction[...], 0.0, 1.0)
    return fraction * self.config.attention.max_span

  def project(self, x, positions):
    """Queries, keys and values [b, l, heads, d] (RoPE applied)."""
    q = jnp.einsum('ble,ehd->blhd', x, self._w(self.wq))
    k = jnp.einsum('ble,ehd->blhd', x, self._w(self.wk))
    v = jnp.einsum('ble,ehd->blhd', x, self._w(self.wv))
    if self.config.positions == 'rope':
      q = layers.apply_rope(q, positions, self.config.rope_max_wavelength)
      k = layers.apply_rope(k, positions, self.config.rope_max_wavelength)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'kv'))
    k = sharding.constrain(k, ('batch', 'length', 'kv_heads', 'kv'))
    v = sharding.constrain(v, ('batch', 'length', 'kv_heads', 'kv'))
    return q, k, v

  def __call__(self, x, *, positions, segment_ids=None, global_mask=None, bias_fn=None):
    """x [b, l, emb] -> ([b, l, emb], aux) with aux holding the mean span if adaptive.

    global_mask [b, l]: the task's global tokens, for global_local layers with
    model.attention.global_tokens = 'marked' (ignored otherwise).
    """
    q, k, v = self.project(x, positions)
    settings = kernel_kwargs(self.config, self.kind)
    aux = {}
    extra = {}
    if self.kind == 'adaptive_span':
      extra['spans'] = self.spans()
      aux['span'] = kernels.span_penalty(extra['spans'])
    if self.kind == 'global_local' and self.config.attention.global_tokens == 'marked':
      if global_mask is None:
        raise ValueError("model.attention.global_tokens = 'marked' needs the batch's "
                         "global_mask (the synthetic tasks give one); use 'prefix' for text.")
      extra['global_mask'] = global_mask.astype(bool)

    def kernel(q, k, v, segment_ids, extra):
      return kernels.get(self.kind)(q, k, v, causal=self.causal, segment_ids=segment_ids,
                                    bias_fn=bias_fn, **settings, **extra)

    if self.config.remat == 'attention':
      # Keep only q, k, v (and the output) for the backward pass: the score
      # tiles, O(length x window) per head, are recomputed instead of stored.
      kernel = jax.checkpoint(kernel, policy=jax.checkpoint_policies.nothing_saveable)
    out = kernel(q, k, v, segment_ids, extra)
    return self.output(out), aux

  # Decoding ---------------------------------------------------------------
  def cache_spec(self, max_length: int) -> kv_cache.LayerSpec:
    """Layout of this layer's decoding cache for positions 0..max_length-1."""
    if not self.causal:
      raise ValueError('Only causal self-attention decodes with a cache.')
    return kv_cache.layer_spec(self.config, self.kind, max_length)

  def init_cache(self, batch: int, max_length: int) -> kv_cache.LayerCache:
    """An empty cache for positions 0..max_length-1."""
    return kv_cache.init(self.cache_spec(max_length), batch, self.config.kv_heads,
                         self.config.dim_per_head, self.config.compute_dtype)

  def prefill(self, x, *, positions, lengths, max_length: int, bias_fn=None):
    """The forward over prompts (the blocked kernel, as __call__) and the cache it leaves.

    x [b, l, emb] right-padded prompts at positions [b, l], lengths [b] their
    real lengths -> ([b, l, emb], LayerCache for positions up to max_length - 1).
    """
    q, k, v = self.project(x, positions)
    kwargs = kernel_kwargs(self.config, self.kind)
    if self.kind == 'adaptive_span':
      kwargs['spans'] = self.spans()
    out = kernels.get(self.kind)(q, k, v, causal=self.causal, bias_fn=bias_fn, **kwargs)
    cache = kv_cache.from_prompt(self.cache_spec(max_length), k, v, lengths)
    return self.output(out), cache

  def decode_step(self, x, *, positions, cache: kv_cache.LayerCache, bias_fn=None):
    """One token per row: x [b, 1, emb] at positions [b] -> ([b, 1, emb], new cache).

    Equals the row of __call__ at that position over the same tokens.
    """
    q, k, v = self.project(x, positions[:, None])
    cache = kv_cache.append(cache, k[:, 0], v[:, 0], positions)
    spans = self.spans() if self.kind == 'adaptive_span' else None
    out = kv_cache.attend(cache, q[:, 0], positions, bias_fn=bias_fn, spans=spans)
    return self.output(out[:, None]), cache


class CrossAttention(_Projections):
  """Decoder queries attend the encoder output (full attention, no positions)."""

  def project_memory(self, encoded):
    """Keys and values of the encoder output, [b, source_len, kv_heads, d]."""
    k = jnp.einsum('ble,ehd->blhd', encoded, self._w(self.wk))
    v = jnp.einsum('ble,ehd->blhd', encoded, self._w(self.wv))
    return (sharding.constrain(k, ('batch', 'kv_length', 'kv_heads', 'kv')),
            sharding.constrain(v, ('batch', 'kv_length', 'kv_heads', 'kv')))

  def __call__(self, x, memory, *, segment_ids, memory_segment_ids):
    """x [b, t, emb]; memory = project_memory(encoded); segment ids match queries to keys."""
    q = jnp.einsum('ble,ehd->blhd', x, self._w(self.wq))
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'kv'))
    k, v = memory
    implementation = self.config.attention.implementation
    out = kernels.dot_product(q, k, v, segment_ids=segment_ids,
                              kv_segment_ids=memory_segment_ids,
                              implementation='auto' if implementation == 'cudnn' else implementation)
    return self.output(out)
