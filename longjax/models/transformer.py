"""The decoder-only language model and the encoder-decoder.

Pre-norm Transformer blocks (RMSNorm, attention, gated MLP) whose attention
kind is chosen per layer (`model.attention.layer_pattern`). Each block can be
rematerialised in the backward pass (`model.remat`), which keeps activation
memory at long lengths to one layer's worth plus the residual stream.

Both models return (logits in fp32, aux) where aux holds, for adaptive-span
layers, `span_penalty` (sum over layers of the mean span in tokens, to be
weighted by `model.attention.span_loss_coef`), `mean_span` and `head_spans`
({layer index: span of each head in tokens}).

With `model.positions = 'learned'`, a stack whose every layer is `chunked`
embeds each token's position modulo `chunk_size`, so that every chunk sees
positions 0.. as if the model ran on it alone ("split, attend, concatenate";
`Stack.embedding_positions`).

Decoding with key/value caches (`longjax.decode` drives these):
`TransformerLM.prefill` / `decode_step`, and `EncoderDecoder.init_decoding` /
`decode_step`; each step's logits equal the teacher-forced forward pass.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from longjax import attention as kernels
from longjax import sharding
from longjax.models import layers
from longjax.models.attention import CrossAttention, SelfAttention
from longjax.models.config import CHUNKED, ModelConfig

# Block-level policies; 'attention' instead rematerialises only inside the
# attention kernel (SelfAttention), and 'none' nothing.
_REMAT_POLICIES = {
    'full': None,  # save nothing inside a block
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


# fold_in tags of the dropout streams of each part of a model (as
# steps.DROPOUT_STREAM separates dropout from other uses of the seed); blocks
# take their layer index and, inside a block, 0 / 1 / 2 per residual branch.
EMBEDDING_STREAM = 10_000
ENCODER_STREAM = 20_000
DECODER_EMBEDDING_STREAM = 30_000
DECODER_STREAM = 40_000


def _norm(config: ModelConfig, rngs):
  return layers.RMSNorm(config.emb_dim, dtype=config.dtype,
                        param_dtype=config.param_dtype, rngs=rngs, eps=config.norm_eps)


def _layer_key(key, index):
  return None if key is None else jax.random.fold_in(key, index)


def _call_block(config: ModelConfig, block, *args, **kwargs):
  """Calls block(*args, **kwargs), rematerialised as `model.remat` says.

  Arrays go through `args`; `kwargs` (the position-bias closure) are closed over.
  """
  if config.remat in ('none', 'attention'):
    return block(*args, **kwargs)
  fn = nnx.remat(lambda block, *a: block(*a, **kwargs), policy=_REMAT_POLICIES[config.remat])
  return fn(block, *args)


def _collect_aux(auxes, head_spans=None) -> dict:
  """The model's aux from its layers'; head_spans: the stack's `head_spans()`."""
  spans = [a['span'] for a in auxes if 'span' in a]
  if not spans:
    return {}
  spans = jnp.stack(spans)
  aux = dict(span_penalty=jnp.sum(spans), mean_span=jnp.mean(spans))
  if head_spans:
    aux['head_spans'] = head_spans
  return aux


def check_length(config: ModelConfig, length: int, what: str = 'sequence'):
  if length > config.max_len:
    raise ValueError(f'{what} length {length} exceeds model.max_len = {config.max_len}; '
                     f'shorten the input or raise model.max_len.')


class Block(nnx.Module):
  """x + attention(norm(x)); x + mlp(norm(x)); optional cross-attention between."""

  def __init__(self, config: ModelConfig, kind: str, *, causal: bool, cross: bool,
               rngs: nnx.Rngs):
    self.config = config
    self.attention_norm = _norm(config, rngs)
    self.attention = SelfAttention(config, kind, causal=causal, rngs=rngs)
    if cross:
      self.cross_norm = _norm(config, rngs)
      self.cross_attention = CrossAttention(config, rngs=rngs)
    self.mlp_norm = _norm(config, rngs)
    self.mlp = layers.MLP(config.emb_dim, config.mlp_dim, activation=config.mlp_activation,
                          dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)

  def __call__(self, x, positions, segment_ids, dropout_key, memory=None,
               memory_segment_ids=None, global_mask=None, *, bias_fn=None,
               summary_bias_fn=None):
    rate = self.config.dropout_rate
    y, aux = self.attention(self.attention_norm(x), positions=positions,
                            segment_ids=segment_ids, global_mask=global_mask, bias_fn=bias_fn,
                            summary_bias_fn=summary_bias_fn)
    x = x + layers.dropout(y, rate, _layer_key(dropout_key, 0))
    if memory is not None:
      y = self.cross_attention(self.cross_norm(x), self.cross_attention.project_memory(memory),
                               segment_ids=segment_ids, memory_segment_ids=memory_segment_ids)
      x = x + layers.dropout(y, rate, _layer_key(dropout_key, 1))
    y = self.mlp(self.mlp_norm(x), tiles=self.config.token_tiles(x.shape[1]))
    x = x + layers.dropout(y, rate, _layer_key(dropout_key, 2))
    return sharding.constrain(x, ('batch', 'length', 'embed')), aux

  # Decoding (no dropout, no remat) ------------------------------------------
  def prefill(self, x, positions, lengths, max_length: int, *, bias_fn=None,
              summary_bias_fn=None, cache_dtype: str = 'auto'):
    """__call__ over right-padded prompts (no cross-attention) -> (x, LayerCache)."""
    y, cache = self.attention.prefill(self.attention_norm(x), positions=positions,
                                      lengths=lengths, max_length=max_length, bias_fn=bias_fn,
                                      summary_bias_fn=summary_bias_fn, cache_dtype=cache_dtype)
    x = x + y
    x = x + self.mlp(self.mlp_norm(x), tiles=self.config.token_tiles(x.shape[1]))
    return sharding.constrain(x, ('batch', 'length', 'embed')), cache

  def decode_step(self, x, positions, cache, memory=None, memory_segment_ids=None, *,
                  bias_fn=None, summary_bias_fn=None):
    """One token per row, x [b, 1, emb] at positions [b] -> (x, cache).

    memory: this block's `cross_attention.project_memory(encoded)`, computed
    once per source; memory_segment_ids [b, source_len] (0 = padding).
    """
    y, cache = self.attention.decode_step(self.attention_norm(x), positions=positions,
                                          cache=cache, bias_fn=bias_fn,
                                          summary_bias_fn=summary_bias_fn)
    x = x + y
    if memory is not None:
      query_segments = jnp.ones(x.shape[:2], jnp.int32)
      x = x + self.cross_attention(self.cross_norm(x), memory, segment_ids=query_segments,
                                   memory_segment_ids=memory_segment_ids)
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ('batch', 'length', 'embed')), cache


class Stack(nnx.Module):
  """Embedding-free stack of blocks with its position scheme and final norm.

  The encoder of a model (bidirectional), or a decoder (causal, with
  cross-attention when `cross`); public so that other models (the peer
  benchmark's encoders) are built from the same parts.
  """

  def __init__(self, config: ModelConfig, kinds, *, causal: bool, cross: bool,
               rngs: nnx.Rngs):
    self.config = config
    # model.share_layers = k: layers i and j use one block's weights when i // k == j // k
    # (ALBERT, Lan et al. 2020, "cross-layer parameter sharing"); `layers` lists each
    # layer's block.
    share = config.share_layers
    self.blocks = nnx.List([Block(config, kind, causal=causal, cross=cross, rngs=rngs)
                            for kind in kinds[::share]])
    self.num_layers = len(kinds)
    if config.positions == 't5_bias':
      self.relative_bias = layers.RelativePositionBias(
          config.num_heads, num_buckets=config.t5_num_buckets,
          max_distance=config.t5_max_distance, bidirectional=not causal,
          param_dtype=config.param_dtype, rngs=rngs)
    if any(kernels.spec(kind).summary_layout is not None for kind in kinds):
      # LongT5's global_relative_attention_bias: the summaries' own T5 table on
      # block distance, shared by the stack's layers like the token table (and
      # used whatever model.positions is: it is part of TGlobal).
      self.summary_bias = layers.RelativePositionBias(
          config.num_heads, num_buckets=config.t5_num_buckets,
          max_distance=config.t5_max_distance, bidirectional=not causal,
          param_dtype=config.param_dtype, rngs=rngs)
    self.final_norm = _norm(config, rngs)

  @property
  def layers(self) -> list:
    """The block of every layer, in order (a shared block appears share_layers times)."""
    return [self.blocks[i // self.config.share_layers] for i in range(self.num_layers)]

  def _biases(self) -> dict:
    """The position-bias closures the blocks take (bias_fn, summary_bias_fn)."""
    return dict(bias_fn=self.relative_bias() if self.config.positions == 't5_bias' else None,
                summary_bias_fn=self.summary_bias() if hasattr(self, 'summary_bias') else None)

  def __call__(self, x, positions, segment_ids, dropout_key, memory=None,
               memory_segment_ids=None, global_mask=None):
    biases = self._biases()
    auxes = []
    for i, block in enumerate(self.layers):
      x, aux = _call_block(self.config, block, x, positions, segment_ids,
                           _layer_key(dropout_key, i), memory, memory_segment_ids,
                           global_mask, **biases)
      auxes.append(aux)
    return self.final_norm(x), auxes

  def head_spans(self) -> dict:
    """{layer index: span of each head in tokens [heads]} of the adaptive-span layers."""
    return {i: block.attention.spans() for i, block in enumerate(self.layers)
            if block.attention.spec.learns_spans}

  def embedding_positions(self, positions):
    """The positions a learned position table reads for this stack's tokens.

    When every layer is chunked, positions restart in every chunk (positions
    modulo chunk_size), so the stack computes exactly what running it on each
    chunk alone and concatenating gives. (Mixed chunked and other layers
    under learned positions are refused by ModelConfig.)
    """
    kinds = {block.attention.kind for block in self.blocks}
    if self.config.positions == 'learned' and kinds == {CHUNKED}:
      return positions % self.config.attention.chunk_size
    return positions

  # Decoding ---------------------------------------------------------------

  def init_caches(self, batch: int, max_length: int, cache_dtype: str = 'auto') -> list:
    """Empty caches of every layer for positions 0..max_length-1."""
    return [block.attention.init_cache(batch, max_length, cache_dtype) for block in self.layers]

  def prefill(self, x, positions, lengths, max_length: int, cache_dtype: str = 'auto'):
    """Like __call__ over right-padded prompts; -> (normed x, caches)."""
    biases = self._biases()
    caches = []
    for block in self.layers:
      x, cache = block.prefill(x, positions, lengths, max_length, cache_dtype=cache_dtype,
                               **biases)
      caches.append(cache)
    return self.final_norm(x), caches

  def decode_step(self, x, positions, caches, memories=None, memory_segment_ids=None):
    """One token per row through every block; memories: one per block or None."""
    biases = self._biases()
    new_caches = []
    for i, block in enumerate(self.layers):
      memory = None if memories is None else memories[i]
      x, cache = block.decode_step(x, positions, caches[i], memory, memory_segment_ids,
                                   **biases)
      new_caches.append(cache)
    return self.final_norm(x), new_caches


class Embedder(nnx.Module):
  """Token embedding (+ learned positions) and the output projection (public, like Stack)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.token = layers.Embed(config.vocab_size, config.emb_dim, **kw)
    if config.positions == 'learned':
      self.position = layers.Embed(config.max_len, config.emb_dim, **kw)
    if not config.tie_embeddings:
      self.head = layers.param(rngs, layers.normal(config.emb_dim ** -0.5),
                               (config.emb_dim, config.vocab_size), ('embed', 'vocab'),
                               config.param_dtype)

  def embed(self, ids, positions, dropout_key):
    x = self.token(ids)
    if self.config.positions == 'learned':
      x = x + self.position(positions)
    x = layers.dropout(x, self.config.dropout_rate, dropout_key)
    return sharding.constrain(x, ('batch', 'length', 'embed'))

  def logits(self, x):
    if self.config.tie_embeddings:
      logits = self.token.attend(x, scaled=self.config.scale_tied_logits)
    else:
      logits = jnp.einsum('ble,ev->blv', x, self.head[...].astype(self.config.dtype),
                          preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ('batch', 'length', 'vocab'))


def _default_positions(ids):
  return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


class TransformerLM(nnx.Module):
  """Decoder-only causal language model."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.arch != 'lm':
      raise ValueError(f"TransformerLM needs model.arch = 'lm'; got {config.arch!r}.")
    self.config = config
    self.embedder = Embedder(config, rngs)
    self.decoder = Stack(config, config.layer_kinds(), causal=True, cross=False, rngs=rngs)

  def __call__(self, inputs, **kwargs):
    """inputs [b, l] int -> (logits [b, l, vocab] fp32, aux); kwargs as `hidden`."""
    x, aux = self.hidden(inputs, **kwargs)
    return self.embedder.logits(x), aux

  def hidden(self, inputs, *, segment_ids=None, positions=None, global_mask=None,
             dropout_key: Optional[jax.Array] = None):
    """inputs [b, l] int -> (final hidden states [b, l, emb], aux): the logits are
    `embedder.logits` of them (which the train step takes tile by tile).

    segment_ids [b, l]: packed documents attend only within themselves;
    positions [b, l]: position of each token in its document (default 0..l-1);
    global_mask [b, l]: the task's global tokens (nonzero), used by global_local
      layers when model.attention.global_tokens = 'marked';
    dropout_key: a PRNG key to train with dropout, None to evaluate.
    """
    check_length(self.config, inputs.shape[1])
    if positions is None:
      positions = _default_positions(inputs)
    x = self.embedder.embed(inputs, self.decoder.embedding_positions(positions),
                            _layer_key(dropout_key, EMBEDDING_STREAM))
    x, auxes = self.decoder(x, positions, segment_ids, dropout_key, global_mask=global_mask)
    return x, _collect_aux(auxes, self.decoder.head_spans())

  # Decoding ---------------------------------------------------------------
  def prefill(self, inputs, lengths, *, max_length: int, cache_dtype: str = 'auto'):
    """Runs right-padded prompts through the model; fills the caches.

    inputs [b, l] (row r's prompt is inputs[r, :lengths[r]]), lengths [b] >= 1,
    max_length: the caches hold positions 0..max_length-1; cache_dtype 'int8':
    their windows quantized (decode.kv_cache_dtype).
    Returns (logits [b, vocab] fp32 of the token after each prompt, caches).
    """
    check_length(self.config, max_length, 'decoding')
    positions = _default_positions(inputs)
    x = self.embedder.embed(inputs, self.decoder.embedding_positions(positions), None)
    x, caches = self.decoder.prefill(x, positions, lengths, max_length, cache_dtype)
    last = jnp.take_along_axis(x, (jnp.asarray(lengths) - 1)[:, None, None], axis=1)
    return self.embedder.logits(last)[:, 0], caches

  def init_caches(self, batch: int, max_length: int, cache_dtype: str = 'auto') -> list:
    check_length(self.config, max_length, 'decoding')
    return self.decoder.init_caches(batch, max_length, cache_dtype)

  def decode_step(self, tokens, positions, caches):
    """tokens [b] at positions [b] -> (logits [b, vocab] fp32 of the next token, caches)."""
    x = self.embedder.embed(tokens[:, None],
                            self.decoder.embedding_positions(positions[:, None]), None)
    x, caches = self.decoder.decode_step(x, positions, caches)
    return self.embedder.logits(x)[:, 0], caches


class EncoderDecoder(nnx.Module):
  """Encoder with long attention over the source; causal decoder with cross-attention."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.arch != 'encoder_decoder':
      raise ValueError(f"EncoderDecoder needs model.arch = 'encoder_decoder'; got "
                       f'{config.arch!r}.')
    self.config = config
    self.embedder = Embedder(config, rngs)
    self.encoder = Stack(config, config.layer_kinds(), causal=False, cross=False, rngs=rngs)
    decoder_kinds = (config.attention.decoder_kind,) * config.num_decoder_layers
    self.decoder = Stack(config, decoder_kinds, causal=True, cross=True, rngs=rngs)

  def encode(self, inputs, *, segment_ids=None, positions=None, dropout_key=None):
    """Source [b, s] -> (encoded [b, s, emb], aux list)."""
    check_length(self.config, inputs.shape[1], 'source')
    if positions is None:
      positions = _default_positions(inputs)
    x = self.embedder.embed(inputs, self.encoder.embedding_positions(positions),
                            _layer_key(dropout_key, EMBEDDING_STREAM))
    return self.encoder(x, positions, segment_ids, _layer_key(dropout_key, ENCODER_STREAM))

  def decode(self, encoded, decoder_inputs, **kwargs):
    """Teacher-forced decoder: -> logits [b, t, vocab] fp32; kwargs as `decode_hidden`."""
    return self.embedder.logits(self.decode_hidden(encoded, decoder_inputs, **kwargs))

  def decode_hidden(self, encoded, decoder_inputs, *, encoder_segment_ids, decoder_segment_ids,
                    decoder_positions=None, dropout_key=None):
    """Teacher-forced decoder: -> final hidden states [b, t, emb]."""
    check_length(self.config, decoder_inputs.shape[1], 'target')
    if decoder_positions is None:
      decoder_positions = _default_positions(decoder_inputs)
    y = self.embedder.embed(decoder_inputs, self.decoder.embedding_positions(decoder_positions),
                            _layer_key(dropout_key, DECODER_EMBEDDING_STREAM))
    y, _ = self.decoder(y, decoder_positions, decoder_segment_ids,
                        _layer_key(dropout_key, DECODER_STREAM), memory=encoded,
                        memory_segment_ids=encoder_segment_ids)
    return y

  def __call__(self, inputs, decoder_inputs, **kwargs):
    """(source [b, s], decoder inputs [b, t]) -> (logits [b, t, vocab] fp32, aux);
    kwargs as `hidden`."""
    y, aux = self.hidden(inputs, decoder_inputs, **kwargs)
    return self.embedder.logits(y), aux

  def hidden(self, inputs, decoder_inputs, *, inputs_segment_ids=None,
             decoder_segment_ids=None, inputs_positions=None, decoder_positions=None,
             dropout_key: Optional[jax.Array] = None):
    """(source [b, s], decoder inputs [b, t]) -> (decoder's final hidden states
    [b, t, emb], aux).

    Segment ids mark real tokens (>= 1) and padding (0); decoder tokens see
    only encoder tokens of the same segment id, so source padding is invisible.
    """
    if inputs_segment_ids is None:
      inputs_segment_ids = jnp.ones(inputs.shape, jnp.int32)
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones(decoder_inputs.shape, jnp.int32)
    encoded, auxes = self.encode(inputs, segment_ids=inputs_segment_ids,
                                 positions=inputs_positions, dropout_key=dropout_key)
    y = self.decode_hidden(encoded, decoder_inputs, encoder_segment_ids=inputs_segment_ids,
                           decoder_segment_ids=decoder_segment_ids,
                           decoder_positions=decoder_positions, dropout_key=dropout_key)
    return y, _collect_aux(auxes, self.encoder.head_spans())

  # Decoding ---------------------------------------------------------------
  def init_decoding(self, inputs, *, inputs_segment_ids=None, max_length: int,
                    cache_dtype: str = 'auto'):
    """Encodes the source once for decoding.

    inputs [b, s], inputs_segment_ids [b, s] (0 = padding; default all 1);
    max_length: decoder positions 0..max_length-1 (bos at 0).
    Returns (memories, caches): each decoder block's projected encoder keys and
    values, and its empty self-attention cache.
    """
    check_length(self.config, max_length, 'decoding')
    if inputs_segment_ids is None:
      inputs_segment_ids = jnp.ones(inputs.shape, jnp.int32)
    encoded, _ = self.encode(inputs, segment_ids=inputs_segment_ids)
    memories = [block.cross_attention.project_memory(encoded) for block in self.decoder.layers]
    return memories, self.decoder.init_caches(inputs.shape[0], max_length, cache_dtype)

  def decode_step(self, tokens, positions, caches, memories, memory_segment_ids):
    """Decoder tokens [b] at positions [b] -> (logits [b, vocab] fp32, caches)."""
    y = self.embedder.embed(tokens[:, None],
                            self.decoder.embedding_positions(positions[:, None]), None)
    y, caches = self.decoder.decode_step(y, positions, caches, memories,
                                         jnp.asarray(memory_segment_ids, jnp.int32))
    return self.embedder.logits(y)[:, 0], caches
