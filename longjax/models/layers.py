"""Building blocks: parameters with logical axis names, norms, embeddings,
the gated MLP, rotary embeddings and T5 relative position buckets.

Every weight is an `nnx.Param` carrying `logical_axes` metadata (one logical
name per dimension); `longjax.sharding` turns those into mesh layouts. Weights
are stored in `param_dtype` (fp32 master weights) and cast to the compute
dtype where they are used; norms, softmax and logits are computed in fp32.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longjax import sharding


def param(rngs: nnx.Rngs, init, shape: Sequence[int], logical_axes: Sequence[str],
          dtype) -> nnx.Param:
  """A weight initialised by init(key, shape, dtype), named axis by axis."""
  if len(shape) != len(logical_axes):
    raise ValueError(f'{len(shape)}-d weight {tuple(shape)} needs {len(shape)} axis names, '
                     f'got {tuple(logical_axes)}')
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(logical_axes))


def normal(stddev: float):
  return jax.nn.initializers.normal(stddev)


def dropout(x, rate: float, key: Optional[jax.Array]):
  """Inverted dropout; identity when key is None (evaluation) or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (T5, LLaMA), computed in fp32."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ('norm',), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    return _rms_norm(x, self.scale[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm(x, scale, eps, dtype):
  # Rematerialised: left to autodiff, each norm saves three float32 copies of
  # its input for the backward (12 bytes per element, 27 of the 51 KB per
  # token a 4-layer d=256 LM saved); recomputing them is one elementwise pass.
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(dtype)


class Embed(nnx.Module):
  """Token embedding; `attend` is the tied output projection (fp32 logits)."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.table = param(rngs, normal(1.0), (vocab_size, dim), ('vocab', 'embed'), param_dtype)
    self.dtype = dtype

  def __call__(self, ids):
    return jnp.take(self.table[...], ids, axis=0).astype(self.dtype)

  def attend(self, x, scaled: bool = True):
    # Unit-variance embeddings: scale the tied readout by 1/sqrt(d) (as T5
    # does) so initial logits are O(1); scaled=False for checkpoints trained
    # without it (Llama, Qwen2 with tied embeddings).
    table = self.table[...].astype(self.dtype)
    logits = jnp.einsum('ble,ve->blv', x, table, preferred_element_type=jnp.float32)
    return logits / math.sqrt(x.shape[-1]) if scaled else logits


def map_tokens(fn, xs, tiles: int):
  """fn over `tiles` tiles of the tokens of xs (a pytree of [b, l, ...] arrays), at once.

  For position-wise work (the MLP, the LM head and its loss): no array of the
  whole length from inside fn ([l, mlp_dim], [l, vocab]) exists at once, and
  each tile is rematerialised in the backward pass, so what is saved is xs
  itself (Arctic Long Sequence Training's tiled MLP and loss, Snowflake 2025;
  MaxText's vocabulary tiling). Tile j holds tokens j, j + tiles, j + 2 tiles...
  (a stride, not a contiguous run), so that a length sharded over devices can
  stay sharded in every tile (when the shards divide l / tiles; the bytes this
  moves on a sequence mesh are not measured yet). tiles = 1: fn(xs).
  """
  if tiles == 1:
    return fn(xs)
  length = jax.tree.leaves(xs)[0].shape[1]
  if length % tiles:
    raise ValueError(f'{tiles} token tiles do not divide the length {length}.')

  def split(x):  # [b, l, ...] -> [tiles, b, l / tiles, ...]
    return jnp.moveaxis(x.reshape(x.shape[0], length // tiles, tiles, *x.shape[2:]), 2, 0)

  def merge(y):  # the inverse
    return jnp.moveaxis(y, 0, 2).reshape(y.shape[1], length, *y.shape[3:])

  ys = jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, xs))
  return jax.tree.map(merge, ys)


MLP_ACTIVATIONS = {'swiglu': jax.nn.silu, 'geglu': jax.nn.gelu, 'gelu': jax.nn.gelu,
                   'relu': jax.nn.relu}
GATED = ('swiglu', 'geglu')


class MLP(nnx.Module):
  """Feed-forward: gated (SwiGLU/GeGLU, Shazeer 2020: act(x W_gate) * x W_up)
  with three matrices, or plain (act(x W_up), as T5 v1.0 and BERT) with two."""

  def __init__(self, dim: int, hidden: int, *, activation: str = 'swiglu', dtype, param_dtype,
               rngs: nnx.Rngs):
    if activation in GATED:
      self.wi_gate = param(rngs, normal(dim ** -0.5), (dim, hidden), ('embed', 'mlp'),
                           param_dtype)
    self.wi_up = param(rngs, normal(dim ** -0.5), (dim, hidden), ('embed', 'mlp'), param_dtype)
    self.wo = param(rngs, normal(hidden ** -0.5), (hidden, dim), ('mlp', 'embed'), param_dtype)
    self.activation = activation
    self.dtype = dtype

  def __call__(self, x, tiles: int = 1):
    """x [b, l, dim] -> [b, l, dim]; over `tiles` token tiles (`map_tokens`) when > 1."""
    w = {name: getattr(self, name)[...].astype(self.dtype)
         for name in ('wi_gate', 'wi_up', 'wo') if hasattr(self, name)}
    act = MLP_ACTIVATIONS[self.activation]

    def apply(x):
      up = jnp.einsum('ble,em->blm', x, w['wi_up'])
      if self.activation in GATED:
        h = act(jnp.einsum('ble,em->blm', x, w['wi_gate'])) * up
      else:
        h = act(up)
      h = sharding.constrain(h, ('batch', 'length', 'mlp'))
      return jnp.einsum('blm,me->ble', h, w['wo'])

    return map_tokens(apply, x, tiles)


def rope_frequencies(head_dim: int, max_wavelength: float, *, scaling: str = 'none',
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_max_len: int = 8192,
                     beta_fast: float = 32.0, beta_slow: float = 1.0,
                     length: Optional[int] = None) -> np.ndarray:
  """float32 [head_dim / 2]: RoPE's angular frequency of each feature pair.

  theta_i = max_wavelength^(-2i/d) (Su et al. 2021), then, for a context extended
  `factor` times:
    * 'linear': theta_i / factor — position interpolation (Chen et al. 2023), the
      same as dividing positions by factor;
    * 'llama3': Llama 3.1's rule (transformers' `_compute_llama3_parameters`):
      wavelengths 2 pi / theta_i longer than original_max_len / low_freq_factor are
      divided by factor, those shorter than original_max_len / high_freq_factor
      kept, and the band between interpolated with s = (original_max_len /
      wavelength - low) / (high - low): theta (1 - s) / factor + theta s;
    * 'yarn' (Peng et al. 2023, "YaRN", eq. 18-20, as transformers'
      `_compute_yarn_parameters` with truncate): dimension i keeps theta_i where
      it turns more than beta_fast times over original_max_len, takes theta_i /
      factor where it turns fewer than beta_slow times, and a linear ramp over the
      (floored / ceiled) dimension range between; its attention temperature is
      `rope_attention_factor`;
    * 'dynamic': dynamic NTK (bloc97 2023; transformers'
      `_compute_dynamic_ntk_parameters`): for a sequence of `length` L beyond
      original_max_len the base grows to base (factor L / original_max_len -
      (factor - 1)) ** (d / (d - 2)); up to original_max_len it is unchanged.
      `length` is the length the model runs at (see `Attention.project`).
  """
  if scaling == 'dynamic':
    length = max(length or original_max_len, original_max_len)
    max_wavelength = max_wavelength * ((factor * length / original_max_len) - (factor - 1)) ** (
        head_dim / (head_dim - 2))
  inv_freq = (1.0 / max_wavelength ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                       / np.float32(head_dim))).astype(np.float32)
  if scaling in ('none', 'dynamic'):
    return inv_freq
  if scaling == 'linear':
    return (inv_freq / factor).astype(np.float32)
  if scaling == 'yarn':
    half = head_dim // 2

    def dimension(rotations):  # the feature index that turns `rotations` times
      return (head_dim * math.log(original_max_len / (rotations * 2 * math.pi))
              / (2 * math.log(max_wavelength)))

    low = max(math.floor(dimension(beta_fast)), 0)
    high = min(math.ceil(dimension(beta_slow)), head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (inv_freq / factor * (1 - keep) + inv_freq * keep).astype(np.float32)
  if scaling != 'llama3':
    raise ValueError(f'rope scaling {scaling!r} is not one of none, linear, llama3, yarn, '
                     'dynamic.')
  wavelength = 2 * np.pi / inv_freq
  long = wavelength > original_max_len / low_freq_factor
  short = wavelength < original_max_len / high_freq_factor
  smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  scaled = np.where(long, inv_freq / factor, inv_freq)
  medium = (1 - smooth) * scaled / factor + smooth * scaled
  return np.where(~short & ~long, medium, scaled).astype(np.float32)


def rope_attention_factor(scaling: str, factor: float, attention_factor: float = -1.0) -> float:
  """What q and k are multiplied by after rotation: YaRN's temperature sqrt(1/t) =
  0.1 ln(factor) + 1 (Peng et al. 2023, eq. 22; transformers' default) unless given."""
  if scaling != 'yarn':
    return 1.0
  if attention_factor > 0:
    return float(attention_factor)
  return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def apply_rope(x, positions, inv_freq):
  """Rotary position embedding (Su et al. 2021) on [b, l, heads, d] at positions [b, l].

  Rotates feature pairs (i, i + d/2) by positions * inv_freq[i] (`rope_frequencies`);
  computed in fp32.
  """
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, d/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def t5_bucket(rel, *, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's relative position bucket of query_pos - key_pos (Raffel et al. 2020).

  Exact buckets for small distances, logarithmic up to max_distance; the
  bidirectional form uses half the buckets for keys after the query.
  """
  n = jnp.asarray(rel, jnp.int32)  # query - key: > 0 means the key is in the past
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nnx.Module):
  """T5 relative position bias, shared by all layers of a stack.

  Calling it returns the `bias_fn` the attention kernels take:
  bias_fn(query_pos - key_pos) -> [..., heads] fp32.
  """

  def __init__(self, num_heads: int, *, num_buckets: int, max_distance: int,
               bidirectional: bool, param_dtype, rngs: nnx.Rngs):
    self.table = param(rngs, normal(0.1), (num_buckets, num_heads), ('relpos_buckets', 'heads'),
                       param_dtype)
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional

  def __call__(self):
    table = self.table[...].astype(jnp.float32)

    def bias_fn(rel):
      bucket = t5_bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                         max_distance=self.max_distance)
      return jnp.take(table, bucket, axis=0)

    return bias_fn
