"""Parameter-efficient fine-tuning: LoRA adapters through Qwix.

LoRA (Hu et al. 2021): a frozen weight W of a projection gains a trainable
low-rank update, y = x W + (alpha / r) x A B, A [in, r] (He-uniform), B [r, out]
(zeros, so a fresh adapter changes nothing). Qwix (`qwix.LoraProvider`,
Google's maintained library, MaxText's) adds A and B as `nnx.LoRAParam`s
beside every weight its rule matches — here by module path,
`model.peft.targets` (default every attention and MLP projection) — and
computes the update inside the model's einsums; longjax writes none of it.

Qwix intercepts one method of the model: `hidden`, which training, `--mode=eval`
and `--mode=context_eval` call. Decoding runs other methods (prefill,
decode_step), so it takes the merged weights (`merged`: W + (alpha / r) A B,
the same function), on a model without adapters. The optimizer updates only
the adapters (train.optimizer.adapters_only): the base weights stay bitwise
as they were loaded, and the optimizer state holds the adapters alone.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
# Tokens of the trace Qwix runs to place the adapters (any length the kernels take).
_TRACE_TOKENS = 16


def enabled(config) -> bool:
  return config.peft.method != 'none'


def is_adapter(path) -> bool:
  return str(path[-1]).endswith(ADAPTER_SUFFIXES)


def apply(model: nnx.Module, config, rngs: nnx.Rngs) -> nnx.Module:
  """`model` with LoRA adapters on every projection `config.peft` targets."""
  import qwix  # pylint: disable=g-import-not-at-top
  p = config.peft
  # No adapter dropout: Qwix's is on in evaluation too and draws from the modules'
  # rngs, where longjax passes dropout keys explicitly.
  provider = qwix.LoraProvider([qwix.LoraRule(module_path=p.targets, rank=p.rank,
                                              alpha=p.alpha)])
  tokens = jnp.zeros((1, min(_TRACE_TOKENS, config.max_len)), jnp.int32)
  inputs = (tokens, tokens) if config.arch == 'encoder_decoder' else (tokens,)
  adapted = qwix.apply_lora_to_model(model, provider, *inputs, rngs=rngs, methods=('hidden',))
  if not any(is_adapter(path) for path, _ in nnx.to_flat_state(nnx.state(adapted, nnx.Param))):
    raise ValueError(f'model.peft.targets={p.targets!r} matches no projection (module paths '
                     'look like decoder/blocks/0/attention, decoder/blocks/0/mlp).')
  return adapted


def without_adapters(config):
  """The same model config with no adapters (what the merged weights fit)."""
  return dataclasses.replace(config, peft=dataclasses.replace(config.peft, method='none'))


def merged(config, params: Mapping) -> dict:
  """The nested parameters of `without_adapters(config)`: every adapted weight
  W + (alpha / rank) A B, in W's dtype; the adapters dropped."""
  scale = config.peft.alpha / config.peft.rank

  def merge(tree):
    out = {}
    for name, value in tree.items():
      if isinstance(value, Mapping):
        out[name] = merge(value)
      elif not str(name).endswith(ADAPTER_SUFFIXES):
        a, b = tree.get(f'{name}_lora_a'), tree.get(f'{name}_lora_b')
        if a is None:
          out[name] = value
          continue
        update = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1)
        if update.shape != value.shape:
          raise ValueError(f'LoRA update of {name}: {update.shape}, weight {value.shape}.')
        out[name] = (jnp.asarray(value, jnp.float32) + scale * update).astype(value.dtype)
    return out

  return merge(params)


def for_decoding(graphdef, params):
  """(graphdef, params) of a model with adapters -> those of the same model with the
  adapters merged (decoding's methods are not the one Qwix intercepts); a model
  without adapters is returned as it is."""
  if not any(is_adapter([getattr(p[-1], 'key', p[-1])])
             for p, _ in jax.tree_util.tree_leaves_with_path(params)):
    return graphdef, params
  from longjax import models  # pylint: disable=g-import-not-at-top
  config = nnx.merge(graphdef, params).config
  plain = without_adapters(config)
  plain_graph, _ = nnx.split(nnx.eval_shape(lambda: models.build(plain, rngs=nnx.Rngs(0))),
                             nnx.Param)
  return plain_graph, merged(config, params)


def adapter_count(params) -> tuple[int, int]:
  """(adapter parameters, all parameters) of a nested parameter dict."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = sum(int(np.prod(v.shape)) for _, v in leaves)
  adapters = sum(int(np.prod(v.shape)) for path, v in leaves
                 if is_adapter([getattr(path[-1], 'key', path[-1])]))
  return adapters, total
