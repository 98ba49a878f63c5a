"""Hugging Face model folders on disk: config.json and safetensors, read lazily, written whole.

A folder holds `config.json` and either `model.safetensors` or shards listed
in `model.safetensors.index.json` (`weight_map`: tensor name -> shard file).
`TensorReader` opens every shard memory-mapped (`safetensors.safe_open`,
numpy) and reads one tensor at a time, so a checkpoint larger than memory
converts; it records which tensors were taken, so the importer can refuse a
folder with tensors it did not map.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

CONFIG = 'config.json'
SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


class HFFormatError(ValueError):
  """A folder that is not a Hugging Face checkpoint longjax can read; names the file or key."""


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.exists(path):
    raise HFFormatError(f'{hf_dir}: no {CONFIG}; --hf_dir must be a Hugging Face model folder '
                        '(config.json and *.safetensors, as save_pretrained writes them).')
  with open(path) as f:
    return json.load(f)


class TensorReader:
  """Name -> numpy array, each read on demand from the folder's safetensors files."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    index_path = os.path.join(hf_dir, INDEX)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise HFFormatError(f'{index_path}: no "weight_map" (tensor name -> shard file).')
    elif os.path.exists(os.path.join(hf_dir, SINGLE)):
      weight_map = None
    else:
      found = sorted(os.listdir(hf_dir))
      raise HFFormatError(f'{hf_dir}: neither {SINGLE} nor {INDEX} (found: {", ".join(found)}); '
                          'PyTorch .bin checkpoints are not read: re-save the model with '
                          'save_pretrained(..., safe_serialization=True).')
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    self._handles = {}
    self._where = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise HFFormatError(f'{index_path}: shard {name} is listed but missing from {hf_dir}.')
      handle = safe_open(path, framework='numpy')
      self._handles[name] = handle
      for key in handle.keys():
        self._where[key] = name
    if weight_map:
      missing = sorted(k for k in weight_map if k not in self._where)
      if missing:
        raise HFFormatError(f'{index_path} lists tensors its shards lack: {", ".join(missing[:5])}.')
    self.taken: set[str] = set()

  def names(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise HFFormatError(f'the checkpoint has no tensor {name!r}, which the architecture needs.')
    self.taken.add(name)
    return self._handles[self._where[name]].get_tensor(name)


def write(hf_dir: str, config: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
  """config.json and model.safetensors (one file) into hf_dir."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(hf_dir, exist_ok=True)
  with open(os.path.join(hf_dir, CONFIG), 'w') as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(hf_dir, SINGLE), metadata={'format': 'pt'})
