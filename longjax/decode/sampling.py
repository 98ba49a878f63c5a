"""Choosing the next token from logits: greedy, temperature, top-k and top-p.

    token = sample_logits(logits, key, temperature=0.8, top_k=40, top_p=0.95)

temperature 0 is greedy (argmax; the key is unused). Otherwise the logits are
divided by the temperature, then restricted to the k most likely tokens
(top_k > 0), then to the nucleus (top_p < 1: the smallest set of most likely
tokens whose probability, renormalised after top-k, reaches top_p; Holtzman
et al. 2020), and a token is drawn from what is left. The settings are Python
numbers, fixed when the decoding function is traced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_settings(temperature: float, top_k: int, top_p: float):
  if temperature < 0:
    raise ValueError(f'config.decode.temperature must be >= 0 (0 = greedy); got {temperature}.')
  if top_k < 0:
    raise ValueError(f'config.decode.top_k must be >= 0 (0 = all tokens); got {top_k}.')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'config.decode.top_p must be in (0, 1]; got {top_p}.')


def filter_logits(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Logits [..., vocab] / temperature with tokens outside top-k / top-p set to -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep a token while the more likely ones hold less than top_p; the most
    # likely token is always kept.
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_logits(logits, key, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0):
  """logits [batch, vocab] -> tokens [batch] int32 (see the module docstring)."""
  if temperature == 0.0 or top_k == 1:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
