"""Will this run fit? `python -m longjax.main --config=... --workdir=DIR --mode=estimate`.

`trainer.estimate_memory` compiles the train step ahead of time, from
abstract shapes (no data read, no state allocated: MaxText's `train_compile`
idea), and prints its `plan`: what one device holds, the parameters, the
optimizer state and the batch (the step's arguments), the peak of its
temporaries from XLA's memory analysis, and the verdict against the device's
memory. Training makes the same plan once its step compiles and warns, before
the first step, when it will not fit (`warn_if_too_large`).

The device's memory: an accelerator's `bytes_limit`; on a CPU, the host's
available memory (MemAvailable) shared by its local devices. XLA's plan
counts the step's buffers only; the runtime, the data pipeline and the
allocator add to it (BENCHMARKS.md compares the plan with measured peaks).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from absl import logging
import jax

from longjax.train import state as state_lib

# A plan above this share of the device's memory is reported as not fitting:
# the runtime, the input pipeline and fragmentation need the rest.
FITS_BELOW = 0.9


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one compiled train step."""
  params: int
  optimizer_state: int
  batch: int
  temporaries: int
  outputs_not_donated: int  # what the step writes beyond the buffers it reuses
  device_memory: Optional[int]  # None: the runtime does not say
  devices_sharing: int  # local devices whose plans share device_memory (CPU: all)

  @property
  def peak(self) -> int:
    return self.params + self.optimizer_state + self.batch + self.temporaries + (
        self.outputs_not_donated)

  @property
  def fits(self) -> Optional[bool]:
    if self.device_memory is None:
      return None
    return self.peak * self.devices_sharing <= FITS_BELOW * self.device_memory

  def lines(self) -> list[str]:
    rows = [('parameters', _size(self.params)),
            ('optimizer state', _size(self.optimizer_state)),
            ('batch', _size(self.batch)),
            ('temporaries (peak)', _size(self.temporaries)),
            ('outputs (new)', _size(self.outputs_not_donated)),
            ('step peak', f'{_size(self.peak)} per device')]
    if self.device_memory is None:
      rows.append(('device memory', 'unknown: no verdict'))
    else:
      shared = f' for {self.devices_sharing} devices' if self.devices_sharing > 1 else ''
      rows.append(('host memory free' if _on_cpu() else 'device memory',
                   f'{_size(self.device_memory)}{shared}'))
      need = self.peak * self.devices_sharing
      rows.append(('verdict', f"{'fits' if self.fits else 'does NOT fit'}: "
                              f'{need / self.device_memory:.0%} of it (fits below '
                              f'{FITS_BELOW:.0%})'))
    return [f'{name:19}{value}' for name, value in rows]


def _size(n: int) -> str:
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def _on_cpu() -> bool:
  return jax.local_devices()[0].platform == 'cpu'


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the first device's)."""
  shard = lambda x: x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return sum(math.prod(shard(x)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_memory() -> tuple[Optional[int], int]:
  """(memory a device may use, how many local devices share it)."""
  if _on_cpu():
    try:
      with open('/proc/meminfo') as f:
        kib = int(next(line for line in f if line.startswith('MemAvailable')).split()[1])
      return kib * 1024, jax.local_device_count()
    except (OSError, StopIteration, ValueError):
      return None, jax.local_device_count()
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  return (int(limit) if limit else None), 1


def plan(compiled, run) -> Optional[MemoryPlan]:
  """The MemoryPlan of a compiled train step of `run` (setup.Run); None where the
  backend gives no memory analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  state = run.abstract_state
  params = _per_device_bytes(state.params)
  opt_state = _per_device_bytes(state.opt_state)
  memory, sharing = device_memory()
  return MemoryPlan(
      params=params, optimizer_state=opt_state,
      batch=max(0, stats.argument_size_in_bytes - _per_device_bytes(state)),
      temporaries=stats.temp_size_in_bytes,
      outputs_not_donated=max(0, stats.output_size_in_bytes - stats.alias_size_in_bytes),
      device_memory=memory, devices_sharing=sharing)


_ADVICE = ('set model.remat (full), lower model.tile_tokens, shard the sequence '
           '(mesh.sequence) or the state (mesh.fsdp), or lower data.batch_size with '
           'loop.grad_accum_steps')


def warn_if_too_large(memory_plan: Optional[MemoryPlan]) -> None:
  if memory_plan is not None and memory_plan.fits is False:
    logging.warning('This train step will probably not fit: %s. To fit, %s.',
                    '; '.join(' '.join(line.split()) for line in memory_plan.lines()[-3:]),
                    _ADVICE)


def report(memory_plan: MemoryPlan, run, tokens_per_step: int) -> str:
  """What --mode=estimate prints (`trainer.estimate_memory`)."""
  header = (f'Memory of one train step: {state_lib.num_params(run.abstract_state.params):,} '
            f'parameters, {tokens_per_step:,} tokens per step, mesh {dict(run.mesh.shape)}')
  text = '\n'.join([header] + ['  ' + line for line in memory_plan.lines()])
  if memory_plan.fits is False:
    text += f'\nTo fit, {_ADVICE}.'
  return text
