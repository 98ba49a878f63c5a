"""HF folders <-> longjax parameters <-> run workdirs.

`import_hf(hf_dir)` gives the model block and the parameters of a HF decoder,
every longjax parameter assigned exactly once from a tensor of the right shape
and every tensor of the folder used (a tensor left over, missing or of
another shape is an error naming it). `write_run` makes a workdir of them — a
checkpoint at step 0 (the parameters and a fresh optimizer state) and its
config.json — which `python -m longjax.main --workdir=...` evaluates, decodes
or fine-tunes like any run. `read_run` and `export_hf` go back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from longjax.convert import architectures, hf_files, t5
from longjax.convert.hf_files import HFFormatError

# Tensors some checkpoints carry that are not parameters (RoPE tables, older
# transformers), recomputed from the config.
_NOT_PARAMETERS = ('.rotary_emb.inv_freq',)


def _flat(tree, prefix=()) -> dict:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, prefix + (key,)))
    return out
  return {prefix: tree}


def _key(path) -> tuple:
  """A param path with list indices as ints (nnx pure dicts may key them either way)."""
  return tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in path)


def param_shapes(model) -> dict:
  """{path: shape} of every parameter of the longjax model (a ModelConfig)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from longjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  _, params = state_lib.abstract_model(model)
  return {_key(path): tuple(v.shape) for path, v in _flat(nnx.to_pure_dict(params)).items()}


def import_hf(hf_dir: str) -> tuple[dict, dict]:
  """(longjax model block, {param path: float32 array}) of a HF decoder folder."""
  from longjax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  hf_config = hf_files.read_config(hf_dir)
  block = architectures.model_block(hf_config)
  model = ModelConfig.from_config(dict(block, dtype='float32', param_dtype='float32'))
  reader = hf_files.TensorReader(hf_dir)
  shapes = param_shapes(model)
  params = {}
  for tensor in architectures.tensors(model):
    expected = shapes.get(tensor.path)
    if expected is None or tensor.path in params:
      raise AssertionError(f'the {hf_config["architectures"][0]} map assigns {tensor.path} '
                           'twice or to no parameter')  # a bug of the map, not of the input
    hf_shape = tensor.to_hf(np.zeros(expected, np.float32)).shape
    if tensor.hf in reader and reader.shape(tensor.hf) != hf_shape:
      raise HFFormatError(f'tensor {tensor.hf}: shape {reader.shape(tensor.hf)}, but config.json '
                          f'makes it {hf_shape} (longjax {"/".join(map(str, tensor.path))} '
                          f'{expected}).')
    params[tensor.path] = tensor.to_longjax(np.asarray(reader.get(tensor.hf), np.float32))
  unassigned = sorted('/'.join(map(str, p)) for p in shapes if p not in params)
  if unassigned:
    raise AssertionError(f'parameters no tensor maps to: {unassigned}')
  embedding = ('shared.weight' if model.arch == 'encoder_decoder'
               else 'model.embed_tokens.weight')
  copies = (*t5.ALIASES, *(['lm_head.weight'] if model.tie_embeddings else []))
  for name in [n for n in copies if n in reader]:
    # save_pretrained may keep tied copies of the embedding; they must be it.
    if not np.array_equal(reader.get(name), reader.get(embedding)):
      raise HFFormatError(f'{name} differs from {embedding}, which config.json ties it to '
                          '(tie_word_embeddings).')
  left = [n for n in reader.names() if n not in reader.taken and not n.endswith(_NOT_PARAMETERS)]
  if left:
    raise HFFormatError(f'{len(left)} tensor(s) of the checkpoint have no place in a '
                        f'{hf_config["architectures"][0]} as longjax reads it: '
                        f'{", ".join(left[:6])}{" ..." if len(left) > 6 else ""}.')
  return block, params


def export_hf(model, params: Mapping, hf_dir: str, architecture_name: str = '') -> dict:
  """Writes config.json and model.safetensors of a longjax LM (model: ModelConfig,
  params: the nested parameter dict); returns the config written."""
  flat = {_key(p): np.asarray(v, np.float32) for p, v in _flat(params).items()}
  config = architectures.hf_config(model, architecture_name)
  tensors = {t.hf: t.to_hf(flat[t.path]) for t in architectures.tensors(model)}
  if model.arch == 'lm' and model.tie_embeddings and model.scale_tied_logits:
    # x E^T / sqrt(d) is a separate head E / sqrt(d) in HF's terms (untied).
    table = flat[('embedder', 'token', 'table')]
    tensors['lm_head.weight'] = (table / np.float32(math.sqrt(model.emb_dim))).astype(np.float32)
  hf_files.write(hf_dir, config, tensors)
  return config


# Run workdirs ---------------------------------------------------------------------------


def _set_leaves(tree, values: Mapping, shardings):
  """`tree` (a nested dict) with each leaf that `values` has replaced by values[path],
  placed as `shardings`; the others kept."""
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(tree, Mapping):
    return {k: _set_leaves(v, {p[1:]: x for p, x in values.items() if p[0] == _key((k,))[0]},
                           shardings[k]) for k, v in tree.items()}
  if not values:
    return tree
  (value,) = values.values()
  return jax.device_put(np.asarray(value, tree.dtype), shardings)


# Longformer (Beltagy et al. 2020, §3.1, and its convert-to-long script): the global
# projections start as copies of the local ones.
_COPIED = {'wq_global': 'wq', 'wk_global': 'wk', 'wv_global': 'wv'}


def converted(params: Mapping, model) -> tuple[dict, list[str]]:
  """The imported parameters for `model` (a ModelConfig whose attention may differ from
  the checkpoint's: the attention conversion of an import), and the paths left at their
  fresh initialisation. Kinds with parameters of their own get Longformer's copies of
  the local projections (global_local) or their initialiser (TGlobal's summary norm:
  ones; adaptive span's spans: model.attention.span_init)."""
  shapes = param_shapes(model)
  out, fresh = {}, []
  for path, shape in shapes.items():
    source = path[:-1] + (_COPIED[path[-1]],) if path[-1] in _COPIED else path
    if source in params:
      if tuple(params[source].shape) != shape:
        raise HFFormatError(f'{"/".join(map(str, path))}: the converted model needs {shape}, '
                            f'the checkpoint gives {tuple(params[source].shape)}.')
      out[path] = params[source]
    else:
      fresh.append('/'.join(map(str, path)))
  unused = sorted('/'.join(map(str, p)) for p in params if p not in shapes)
  if unused:
    raise HFFormatError(f'the converted model has no place for {", ".join(unused[:4])}: change '
                        'only the attention kinds and their settings at import.')
  return out, fresh


def workdir_in_use(workdir: str):
  """Why an import may not write into `workdir` (None: it may): it holds a run."""
  import os  # pylint: disable=g-import-not-at-top
  from longjax.train import run_identity, setup  # pylint: disable=g-import-not-at-top
  for name in (setup.CHECKPOINTS, run_identity.CONFIG_FILE):
    if os.path.exists(os.path.join(workdir, name)):
      return f'already holds a run ({name}); import into a new --workdir.'
  return None


def write_run(config, workdir: str, params: Mapping) -> int:
  """A workdir holding `params` as step 0 of the run `config` describes (a ConfigDict
  whose model block is the imported one); returns the parameter count."""
  from longjax.train import run_identity, setup  # pylint: disable=g-import-not-at-top
  run = setup.build_run(config, workdir)
  vocab = run.config.model.vocab_size
  expected = params[('embedder', 'token', 'table')].shape[0]
  if vocab != expected:
    raise HFFormatError(
        f'the task\'s tokenizer ({config.tokenizer.kind}) has {vocab} tokens, the checkpoint '
        f'{expected}: the embedding rows would stand for other tokens. Use a task config '
        'whose tokenizer is the model\'s (tokenizer.kind / tokenizer.spm_model_path).')
  params, fresh = converted(params, run.config.model)
  if fresh:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.info('Attention conversion: %d parameter(s) the checkpoint lacks start at their '
                 'initialiser: %s.', len(fresh), ', '.join(fresh[:6]))
  with run.checkpointer() as c:
    state = run.fresh_state()
    state = dataclasses.replace(state, params=_set_leaves(state.params, params,
                                                          run.shardings.params))
    c.save(0, state)
    c.wait()
  run_identity.record_start(config, run.workdir, step=0, resume=None)
  return sum(int(np.prod(v.shape)) for v in params.values())


def read_run(config, workdir: str):
  """(ModelConfig, nested params as numpy) of a run's latest checkpoint, LoRA adapters
  merged; config: the command's config, checked against the run's as --mode=eval does."""
  import jax  # pylint: disable=g-import-not-at-top
  from longjax.train import run_identity, setup  # pylint: disable=g-import-not-at-top
  from longjax.models import peft  # pylint: disable=g-import-not-at-top
  config = run_identity.evaluation_config(config, workdir, mode='export')
  run = setup.build_run(config, workdir)
  _, state = run.restore_latest()
  model, params = run.config.model, state.params
  if peft.enabled(model):  # LoRA: the adapters merged into their weights
    model, params = peft.without_adapters(model), peft.merged(model, params)
  return model, jax.tree.map(np.asarray, params)


# The run's own config file ---------------------------------------------------------------

IMPORTED = 'imported.json'  # the task config, its overrides and the checkpoint's model block
CONFIG_FILE = 'imported_config.py'
_CONFIG_SOURCE = '''"""The config of the run in this directory, imported by longjax.convert: the task
config and overrides it was imported with, and the checkpoint's architecture
(imported.json beside this file). Pass it to longjax.main with --workdir set here."""
import os

from longjax.convert import checkpoints


def get_config(arg=''):
  return checkpoints.imported_config(os.path.dirname(os.path.abspath(__file__)), arg)
'''


def with_model(config, block: Mapping, overrides=()):
  """config with its model block's architecture fields replaced by `block`'s, except
  the attention fields `overrides` ('field=value' strings) set: an attention
  conversion at import (e.g. model.attention.layer_pattern=local,local,full)."""
  chosen = {o.split('=', 1)[0][len('model.attention.'):] for o in overrides
            if o.startswith('model.attention.')}
  for key, value in block.items():
    if key == 'attention':
      for name, setting in value.items():
        if name not in chosen:
          config.model.attention[name] = setting
    else:
      config.model[key] = value
  return config


def write_config_file(workdir: str, spec: str, overrides, block: Mapping) -> str:
  """workdir/imported_config.py (and imported.json): the run's config, for longjax.main."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path, colon, arg = spec.partition(':')
  record = dict(task=os.path.abspath(path) + colon + arg, overrides=list(overrides),
                model=dict(block))
  with open(os.path.join(workdir, IMPORTED), 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(_CONFIG_SOURCE)
  return os.path.join(workdir, CONFIG_FILE)


def imported_config(workdir: str, arg: str = ''):
  """The config an import recorded in workdir (`arg` must be empty: the task's was kept)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if arg:
    raise ValueError(f'{CONFIG_FILE} takes no argument (the task config\'s was recorded); '
                     f'got {arg!r}. Override fields with --config.FIELD=VALUE.')
  with open(os.path.join(workdir, IMPORTED)) as f:
    record = json.load(f)
  from longjax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load(record['task'], record['overrides'])
  with config.unlocked():
    return with_model(config, record['model'], record['overrides'])


# Python API ------------------------------------------------------------------------------


def from_hf(hf_dir: str, **model_fields):
  """(ModelConfig, model) of a HF folder: the longjax model holding its weights, in
  float32 unless model_fields say otherwise (any model field: dtype, attention, ...)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from longjax import models  # pylint: disable=g-import-not-at-top
  from longjax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  block, params = import_hf(hf_dir)
  attention = dict(block['attention'], **model_fields.pop('attention', {}))
  config = ModelConfig.from_config(dict(block, **dict(dict(dtype='float32'), **model_fields),
                                        attention=attention))
  params, _ = converted(params, config)
  model = models.build(config, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)

  def fill(tree, prefix=()):
    return {k: fill(v, prefix + (k,)) if isinstance(v, Mapping) else
            params.get(_key(prefix + (k,)), v) for k, v in tree.items()}

  nnx.replace_by_pure_dict(state, fill(pure))
  nnx.update(model, state)
  return config, model


def to_hf(config, model, hf_dir: str, architecture_name: str = '') -> dict:
  """Writes a longjax model (LoRA adapters merged) as a HF folder; returns its config.json."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from longjax.models import peft  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if peft.enabled(config):
    config, params = peft.without_adapters(config), peft.merged(config, params)
  return export_hf(config, params, hf_dir, architecture_name)
