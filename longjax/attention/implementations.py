"""Which implementation computes an attention call: one axis for every kind.

`model.attention.implementation` (and every kernel's `implementation=`) is one of

  * 'xla': the blocked kernels of this package; every kind, every backend;
  * 'cudnn': jax.nn.dot_product_attention's fused cuDNN kernel (GPU): full
    attention and causal local attention without segments or a bias;
  * 'splash': the TPU's block-sparse flash attention (longjax.attention.splash);
  * 'pallas_gpu': longjax's block-sparse flash-attention kernel for GPUs
    (longjax.attention.pallas_gpu, Triton);
  * 'auto': the best of them that computes the call exactly on this backend
    (GPU: cudnn, then pallas_gpu; TPU: splash; else xla), logged once per
    kind and choice.

A kind's registry entry lists the implementations that compute it; the kernel
says, for its call, why each of them cannot (`problems`). Asking for one that
cannot compute the call is a ValueError naming the reason, raised while
tracing, before anything compiles. Asking for 'splash' or 'pallas_gpu' on a
CPU runs the same kernel in Pallas interpret mode (slow; for tests and for
reading the kernel), so every kernel runs on a machine without an accelerator.

Why cuDNN is narrower than it looks (jax 0.10.2, jax/_src/nn/functions.py and
jax/_src/cudnn/fused_attention_stablehlo.py): it has only a left window
(`(r, r)` raises "cuDNN doesn't support right window"), no segment ids in the
public API, refuses inputs sharded on the sequence axis, and caps head_dim at
256 on Hopper and newer (128 before).
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from absl import logging

from longjax import sharding

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash', 'pallas_gpu')
# The backend each accelerator kernel is written for.
NATIVE_BACKEND = {'cudnn': 'gpu', 'splash': 'tpu', 'pallas_gpu': 'gpu'}
# What 'auto' tries, in order, on each backend.
AUTO_ORDER = {'gpu': ('cudnn', 'pallas_gpu'), 'tpu': ('splash',)}


class Choice(NamedTuple):
  name: str  # one of IMPLEMENTATIONS except 'auto'
  interpret: bool = False  # a Pallas kernel run by the interpreter (CPU)


class _Target(threading.local):
  backend: Optional[str] = None


_target = _Target()


def backend() -> str:
  """The backend calls are routed for: jax's default, or the one `for_backend` set."""
  return _target.backend or jax.default_backend()


@contextlib.contextmanager
def for_backend(name: str):
  """Routes calls traced inside as if on backend `name` ('gpu', 'tpu', 'cpu').

  For `jax.export(..., platforms=['tpu'|'cuda'])` from a CPU host: the kernels
  are then built for that accelerator (not interpreted), so exporting catches
  a block shape or lowering error here rather than on a pod.
  """
  if name not in ('cpu', 'gpu', 'tpu'):
    raise ValueError(f"for_backend: name must be 'cpu', 'gpu' or 'tpu'; got {name!r}.")
  old, _target.backend = _target.backend, name
  try:
    yield
  finally:
    _target.backend = old


def _cudnn_head_dim_cap() -> int:
  """256 on compute capability >= 9.0 (Hopper), else 128 (fused_attention_stablehlo.py)."""
  if jax.default_backend() != 'gpu':
    return 128  # routing for a GPU from another host: the cap every GPU accepts
  try:
    capability = float(getattr(jax.devices()[0], 'compute_capability', '0'))
  except (TypeError, ValueError):
    capability = 0.0
  return 256 if capability >= 9.0 else 128


def problems(q, *, segment_ids, bias_fn, self_attention: bool = True,
             window: Optional[int] = None, extra: Optional[dict] = None) -> dict[str, str]:
  """{implementation: why it cannot compute this call} for the kernels that
  share the band-mask conditions; kinds add their own through `extra`.

  window: how far a query reaches (a band's larger side), for kinds whose
  splash and pallas_gpu calls run on a sequence-sharded input by exchanging
  that many keys with each neighbouring shard (band._halo_output); None: the
  call needs whole sequences.
  """
  found = {}
  sequence_shards = sharding.mesh_axis_size('sequence')
  fused = ('cudnn', 'splash', 'pallas_gpu')
  if bias_fn is not None:
    for name in fused:
      found[name] = 'a position bias (t5_bias) is not an input of the fused kernels'
  if sequence_shards > 1:
    shard = q.shape[1] // sequence_shards
    halo_fits = window is not None and window <= shard and q.shape[1] % sequence_shards == 0
    for name in fused:
      if name == 'cudnn' or not halo_fits:
        found.setdefault(name, f'the input is sharded over mesh.sequence = {sequence_shards} '
                               + ('(cuDNN refuses a sharded sequence)' if name == 'cudnn' else
                                  '(this call needs whole sequences, or a window longer '
                                  f'than a shard of {shard} tokens)'))
  if segment_ids is not None:
    found.setdefault('cudnn', "segment ids need a dense mask in jax's cuDNN API")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    found.setdefault('cudnn', f'cuDNN attention takes bf16/fp16, not {q.dtype}')
  cap = _cudnn_head_dim_cap()
  if q.shape[-1] % 8 or q.shape[-1] > cap:
    found.setdefault('cudnn', f'head_dim {q.shape[-1]} must be a multiple of 8 and <= {cap}')
  if q.shape[-1] > 256:
    found.setdefault('pallas_gpu', f'head_dim {q.shape[-1]} is over 256')
  if not self_attention:
    found.setdefault('splash', 'cross-attention (a query may see no key, and splash '
                               'returns the mean of the values there, not 0)')
  for name, why in (extra or {}).items():
    if why:
      found.setdefault(name, why)
  return found


_logged: set = set()


def _log_once(name: str, chosen: str, why: str):
  key = (name, chosen, why)
  if key not in _logged:
    _logged.add(key)
    logging.info('attention %s: implementation %r%s', name, chosen, f' ({why})' if why else '')


def choose(implementation: str, name: str, *, supported: tuple[str, ...],
           problems_found: Optional[dict] = None) -> Choice:
  """The implementation that computes this call of kind `name`.

  supported: the kind's implementations (its registry entry); problems_found:
  {implementation: why not} for this call (see `problems`).
  """
  problems_found = problems_found or {}
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{name}: implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}; "
        f'got {implementation!r}.')
  if implementation != 'auto' and implementation not in supported:
    raise ValueError(
        f'{name}: implementation={implementation!r} does not compute this kind; it has '
        f"{', '.join(map(repr, supported))}. Use 'auto' or 'xla'.")
  here = backend()
  if implementation == 'auto':
    skipped = []
    for candidate in AUTO_ORDER.get(here, ()):
      if candidate not in supported:
        continue
      if candidate in problems_found:
        skipped.append(f'not {candidate}: {problems_found[candidate]}')
        continue
      _log_once(name, candidate, '')
      return Choice(candidate)
    _log_once(name, 'xla', '; '.join(skipped))
    return Choice('xla')
  if implementation == 'xla':
    return Choice('xla')
  native = NATIVE_BACKEND[implementation]
  interpret = here == 'cpu' and implementation != 'cudnn'
  if here != native and not interpret:
    raise ValueError(
        f'{name}: implementation={implementation!r} runs on {native.upper()}s (or, for the '
        f'Pallas kernels, interpreted on a CPU); this backend is {here!r}. Use \'auto\'.')
  if implementation in problems_found:
    raise ValueError(f'{name}: implementation={implementation!r} cannot compute this call: '
                     f"{problems_found[implementation]}. Use 'auto' or 'xla'.")
  return Choice(implementation, interpret)
