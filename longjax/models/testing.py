"""Tiny models for tests, notebooks and benchmarks (after gemma's `gm.testing`).

    config = testing.tiny_model_config(kind)       # a 2-layer fp32 LM, kind in attention.KINDS
    config = testing.tiny_model_config(kind, arch='encoder_decoder', num_decoder_layers=1)

Small enough that every window wraps within a 13-token prompt: radius 4 (a
ring of 5), 2 global tokens, blocks and chunks of 4, spans up to 8; 4 query
heads over 2 key/value heads, so grouped-query attention is always exercised.
"""
from __future__ import annotations

from longjax import attention
from longjax.models.config import ModelConfig

TINY_ATTENTION = dict(radius=4, num_global=2, summary_block=4, level0_block=4, chunk_size=4,
                      max_span=8, span_ramp=2.0, span_init=0.5)

TINY_MODEL = dict(arch='lm', num_layers=2, emb_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  vocab_size=50, max_len=128, dtype='float32', param_dtype='float32')


def tiny_model_config(attention_kind: str = attention.DEFAULT_KIND, **overrides) -> ModelConfig:
  """TINY_MODEL with `attention_kind`; overrides replace model fields, and
  `attention=dict(...)` replaces attention fields."""
  attention = dict(TINY_ATTENTION, kind=attention_kind, **overrides.pop('attention', {}))
  return ModelConfig.from_config(dict(TINY_MODEL, **overrides, attention=attention))
