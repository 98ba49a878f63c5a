"""longjax.models: the decoder-only LM and the encoder-decoder (Flax NNX).

    from longjax import models
    config = models.ModelConfig.from_config(cfg.model)   # validates, resolves
    model = models.build(config, rngs=nnx.Rngs(0))

Parts for other models: `Embedder` (token embedding and output projection)
and `Stack` (blocks, position scheme, final norm). Tiny test models:
`longjax.models.testing`.
"""
from flax import nnx

from longjax.models import peft
from longjax.models.config import AttentionConfig, ModelConfig, PeftConfig
from longjax.models.transformer import EncoderDecoder, Embedder, Stack, TransformerLM


def build(config: ModelConfig, *, rngs: nnx.Rngs):
  """TransformerLM or EncoderDecoder, as `config.arch` says; with LoRA adapters when
  `config.peft.method` is 'lora'."""
  if not isinstance(config, ModelConfig):
    config = ModelConfig.from_config(config)
  model = TransformerLM(config, rngs=rngs) if config.arch == 'lm' else EncoderDecoder(
      config, rngs=rngs)
  if peft.enabled(config):  # LoRA adapters through Qwix (models/peft.py)
    model = peft.apply(model, config, rngs)
  return model


__all__ = ['AttentionConfig', 'Embedder', 'EncoderDecoder', 'ModelConfig', 'PeftConfig', 'Stack',
           'TransformerLM', 'build', 'peft']
