"""longjax.models: the decoder-only LM and the encoder-decoder (Flax NNX).

    from longjax import models
    config = models.ModelConfig.from_config(cfg.model)   # validates, resolves
    model = models.build(config, rngs=nnx.Rngs(0))

Parts for other models: `Embedder` (token embedding and output projection)
and `Stack` (blocks, position scheme, final norm). Tiny test models:
`longjax.models.testing`.
"""
from flax import nnx

from longjax.models.config import AttentionConfig, ModelConfig
from longjax.models.transformer import EncoderDecoder, Embedder, Stack, TransformerLM


def build(config: ModelConfig, *, rngs: nnx.Rngs):
  """TransformerLM or EncoderDecoder, as `config.arch` says."""
  if not isinstance(config, ModelConfig):
    config = ModelConfig.from_config(config)
  return TransformerLM(config, rngs=rngs) if config.arch == 'lm' else EncoderDecoder(
      config, rngs=rngs)


__all__ = ['AttentionConfig', 'Embedder', 'EncoderDecoder', 'ModelConfig', 'Stack',
           'TransformerLM', 'build']
