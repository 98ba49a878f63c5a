"""Generation with a key/value cache for TransformerLM and EncoderDecoder.

Functional and jitted: the model comes as `graphdef, params = nnx.split(model,
nnx.Param)`, so the same compiled function serves every checkpoint.

    settings = DecodeSettings.from_config(config.decode)
    out = generate(graphdef, params, prompts, prompt_lengths, settings=settings, rng=key)
    out = generate_seq2seq(graphdef, params, inputs, inputs_segment_ids, settings=settings)
    out.tokens  # [batch, max_decode_len]: eos included, then padding

LM: right-padded prompts go through the model's own forward pass (the blocked
kernels) once, which fills each layer's cache (`longjax.models.cache`); then
one token per step. Encoder-decoder: the source is encoded once, each decoder
block's cross-attention keys and values are projected once, and the decoder
starts from bos at position 0. `settings.beam_size > 1` runs beam search
(`search.beam_search`), else sampling/greedy (`search.sample_loop`).

Sharding: given a mesh, the functions trace under `sharding.axis_rules`, so
activations and caches take the logical layouts of training (batch over
data/fsdp, kv heads over tensor); pass params already placed on that mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longjax import models
from longjax import sharding
from longjax.data import tokenizers
from longjax.decode import sampling
from longjax.decode import search


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How to decode (hashable: a static argument of the jitted functions)."""
  max_decode_len: int = 128       # Longest generation, eos included.
  beam_size: int = 1              # 1 = sampling / greedy; > 1 = beam search.
  length_penalty: float = 0.6     # Beam search: alpha of ((5 + len) / 6) ** alpha.
  temperature: float = 0.0        # 0 = greedy.
  top_k: int = 0                  # Sample among the k most likely tokens (0 = all).
  top_p: float = 1.0              # Nucleus mass.
  eos_id: Optional[int] = tokenizers.EOS_ID  # Rows stop after it; None = never.
  pad_id: int = tokenizers.PAD_ID
  return_logits: bool = False     # Sampling only: keep every step's logits.
  kv_cache_dtype: str = 'auto'    # 'int8': caches' windows quantized per token and head.

  @classmethod
  def from_config(cls, decode_config, **overrides) -> 'DecodeSettings':
    """From the `decode` block of a config; overrides win."""
    fields = dict(max_decode_len=int(decode_config.max_decode_len),
                  beam_size=int(decode_config.beam_size),
                  length_penalty=float(decode_config.length_penalty),
                  temperature=float(decode_config.temperature),
                  top_k=int(decode_config.top_k), top_p=float(decode_config.top_p),
                  kv_cache_dtype=str(decode_config.get('kv_cache_dtype', 'auto')))
    fields.update(overrides)
    return cls(**fields).validate()

  def validate(self) -> 'DecodeSettings':
    if self.max_decode_len < 1:
      raise ValueError(f'config.decode.max_decode_len must be >= 1; got {self.max_decode_len}.')
    if self.beam_size < 1:
      raise ValueError(f'config.decode.beam_size must be >= 1; got {self.beam_size}.')
    sampling.check_settings(self.temperature, self.top_k, self.top_p)
    if self.kv_cache_dtype not in ('auto', 'int8'):
      raise ValueError(f"config.decode.kv_cache_dtype must be 'auto' or 'int8'; got "
                       f'{self.kv_cache_dtype!r}.')
    if self.beam_size > 1 and (self.temperature > 0 or self.top_k > 1 or self.top_p < 1):
      raise ValueError('config.decode: beam search (beam_size > 1) is deterministic; set '
                       'temperature = 0, top_k = 0 and top_p = 1, or beam_size = 1 to sample.')
    if self.beam_size > 1 and self.return_logits:
      raise ValueError('return_logits is for sampling/greedy decoding (beam_size = 1).')
    return self


class Generation(NamedTuple):
  """tokens [b, n] (the best beam; eos included, then pad); lengths [b] (tokens
  up to and with eos); scores [b] (sampling: the sum of log-probabilities;
  beam search: the length-penalised score of the best beam); beams [b, beam,
  n] and beam_scores [b, beam] (beam search) or None; logits [b, n, vocab]
  (with return_logits) or None; cache: the caches after sampling (None after
  beam search)."""
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  beams: Optional[jax.Array] = None
  beam_scores: Optional[jax.Array] = None
  logits: Optional[jax.Array] = None
  cache: Any = None


def _rules(mesh, rules):
  return sharding.axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()


def _run(decoder, rng, settings: DecodeSettings):
  first_logits, caches, start_positions, step_fn = decoder
  if settings.beam_size > 1:
    beams = search.beam_search(step_fn, first_logits, caches, start_positions=start_positions,
                               beam_size=settings.beam_size,
                               max_decode_len=settings.max_decode_len,
                               alpha=settings.length_penalty, eos_id=settings.eos_id,
                               pad_id=settings.pad_id)
    return Generation(beams.tokens[:, 0], beams.lengths[:, 0], beams.scores[:, 0],
                      beams=beams.tokens, beam_scores=beams.scores)
  out = search.sample_loop(step_fn, first_logits, caches, start_positions=start_positions,
                           max_decode_len=settings.max_decode_len, rng=rng,
                           temperature=settings.temperature, top_k=settings.top_k,
                           top_p=settings.top_p, eos_id=settings.eos_id, pad_id=settings.pad_id,
                           return_logits=settings.return_logits)
  return Generation(out.tokens, out.lengths, out.log_probs, logits=out.logits, cache=out.cache)


class Decoder(NamedTuple):
  """What the decoding loops need: the logits of the first generated token, the
  caches after the prompt, the position of the first generated token per row,
  and step_fn(tokens, positions, caches) -> (logits, caches)."""
  first_logits: jax.Array
  caches: Any
  start_positions: jax.Array
  step_fn: search.StepFn


def lm_decoder(model, prompt, lengths, *, max_decode_len: int,
               cache_dtype: str = 'auto') -> Decoder:
  """A TransformerLM after prefilling right-padded prompts (the blocked kernels)."""
  # Positions fed to the cache: up to lengths + max_decode_len - 2.
  max_length = prompt.shape[1] + max_decode_len - 1
  first_logits, caches = model.prefill(prompt, lengths, max_length=max_length,
                                       cache_dtype=cache_dtype)
  return Decoder(first_logits, caches, lengths, model.decode_step)


def seq2seq_decoder(model, inputs, inputs_segment_ids, *, max_decode_len: int,
                    beam_size: int = 1, cache_dtype: str = 'auto') -> Decoder:
  """An EncoderDecoder after encoding the source and feeding bos at position 0.

  The step function attends the encoder memory repeated beam_size times (the
  rows of beam search); the first logits and caches have one row per source.
  """
  batch = inputs.shape[0]
  # bos at position 0, token i fed at position i + 1 (the last one is not fed).
  memories, caches = model.init_decoding(inputs, inputs_segment_ids=inputs_segment_ids,
                                         max_length=max_decode_len, cache_dtype=cache_dtype)
  bos = jnp.full((batch,), tokenizers.BOS_ID, jnp.int32)
  zeros = jnp.zeros((batch,), jnp.int32)
  first_logits, caches = model.decode_step(bos, zeros, caches, memories, inputs_segment_ids)
  memories = search.expand_beams(memories, beam_size) if beam_size > 1 else memories
  segment_ids = search.expand_beams(inputs_segment_ids, beam_size) if beam_size > 1 \
      else inputs_segment_ids
  step_fn = lambda tokens, positions, caches: model.decode_step(tokens, positions, caches,
                                                                memories, segment_ids)
  return Decoder(first_logits, caches, zeros + 1, step_fn)


@functools.partial(jax.jit, static_argnames=('graphdef', 'settings', 'mesh', 'rules'))
def _generate_lm(graphdef, params, prompt, lengths, rng, *, settings, mesh, rules):
  with _rules(mesh, rules):
    model = _merged(graphdef, params, models.TransformerLM)
    decoder = lm_decoder(model, prompt, lengths, max_decode_len=settings.max_decode_len,
                         cache_dtype=settings.kv_cache_dtype)
    return _run(decoder, rng, settings)


@functools.partial(jax.jit, static_argnames=('graphdef', 'settings', 'mesh', 'rules'))
def _generate_seq2seq(graphdef, params, inputs, inputs_segment_ids, rng, *, settings, mesh,
                      rules):
  with _rules(mesh, rules):
    model = _merged(graphdef, params, models.EncoderDecoder)
    decoder = seq2seq_decoder(model, inputs, inputs_segment_ids,
                              max_decode_len=settings.max_decode_len,
                              beam_size=settings.beam_size, cache_dtype=settings.kv_cache_dtype)
    return _run(decoder, rng, settings)


def _merged(graphdef, params, model_type):
  model = nnx.merge(graphdef, params)
  if not isinstance(model, model_type):
    raise ValueError(f'{model_type.__name__} decoding got a {type(model).__name__}; use '
                     f'{"generate_seq2seq" if model_type is models.TransformerLM else "generate"}.')
  return model


def generate(graphdef, params, prompt, prompt_lengths=None, *,
             settings: DecodeSettings = DecodeSettings(), rng=None, mesh=None,
             rules=sharding.DEFAULT_RULES) -> Generation:
  """Continues right-padded prompts with a TransformerLM.

  Args:
    graphdef, params: `nnx.split(model, nnx.Param)` of a TransformerLM.
    prompt: [batch, prompt_len] int; row r's prompt is prompt[r, :prompt_lengths[r]].
    prompt_lengths: [batch] int >= 1; default prompt_len for every row.
    settings: DecodeSettings (greedy by default).
    rng: PRNG key for sampling (default key 0).
    mesh, rules: trace under `sharding.axis_rules(mesh, rules)` (training layouts).
  Returns:
    Generation; token i of row r stands at position prompt_lengths[r] + i.
  Raises:
    ValueError if prompt_len + max_decode_len - 1 exceeds model.max_len.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f'generate: prompt must be [batch, prompt_len >= 1]; got {prompt.shape}.')
  if prompt_lengths is None:
    prompt_lengths = np.full((prompt.shape[0],), prompt.shape[1], np.int32)
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (prompt.shape[0],) or lengths.min() < 1 or lengths.max() > prompt.shape[1]:
    raise ValueError(f'generate: prompt_lengths must be [batch] in [1, {prompt.shape[1]}]; got '
                     f'{lengths.tolist()}.')
  settings = settings.validate()
  rng = jax.random.key(0) if rng is None else rng
  return _generate_lm(graphdef, params, prompt, jnp.asarray(lengths, jnp.int32), rng,
                      settings=settings, mesh=mesh, rules=tuple(rules))


def generate_seq2seq(graphdef, params, inputs, inputs_segment_ids=None, *,
                     settings: DecodeSettings = DecodeSettings(), rng=None, mesh=None,
                     rules=sharding.DEFAULT_RULES) -> Generation:
  """Decodes a target for each source with an EncoderDecoder.

  Args:
    graphdef, params: `nnx.split(model, nnx.Param)` of an EncoderDecoder.
    inputs: [batch, source_len] int source ids (eos-terminated, padded).
    inputs_segment_ids: [batch, source_len], 1 on the source, 0 on padding
      (default: inputs != pad).
    settings, rng, mesh, rules: as in `generate`.
  Returns:
    Generation; the decoder starts from bos, token i stands at position i + 1.
  """
  inputs = jnp.asarray(inputs, jnp.int32)
  if inputs.ndim != 2:
    raise ValueError(f'generate_seq2seq: inputs must be [batch, source_len]; got {inputs.shape}.')
  if inputs_segment_ids is None:
    inputs_segment_ids = (inputs != tokenizers.PAD_ID).astype(jnp.int32)
  settings = settings.validate()
  rng = jax.random.key(0) if rng is None else rng
  return _generate_seq2seq(graphdef, params, inputs,
                           jnp.asarray(inputs_segment_ids, jnp.int32), rng,
                           settings=settings, mesh=mesh, rules=tuple(rules))
