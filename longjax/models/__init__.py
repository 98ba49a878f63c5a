"""longjax.models: the decoder-only LM and the encoder-decoder (Flax NNX).

    from longjax import models
    config = models.ModelConfig.from_config(cfg.model)   # validates
    model = models.build(config, rngs=nnx.Rngs(0))
"""
from flax import nnx

from longjax.models.config import AttentionConfig, ModelConfig
from longjax.models.transformer import EncoderDecoder, TransformerLM


def build(config: ModelConfig, *, rngs: nnx.Rngs):
  """TransformerLM or EncoderDecoder, as `config.kind` says."""
  if not isinstance(config, ModelConfig):
    config = ModelConfig.from_config(config)
  return TransformerLM(config, rngs=rngs) if config.kind == 'lm' else EncoderDecoder(
      config, rngs=rngs)


__all__ = ['AttentionConfig', 'EncoderDecoder', 'ModelConfig', 'TransformerLM', 'build']
