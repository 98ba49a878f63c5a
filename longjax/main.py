"""Command line: python -m longjax.main --config=configs/base.py --workdir=DIR [--mode=eval|decode].

Any config field can be overridden as --config.x.y=value; the config is
locked, so a misspelled field is an error. On Linux the process restarts
itself once with transparent huge pages for large host allocations
(longjax/hostmem.py; LONGJAX_HUGEPAGES=0 opts out). Launch commands for a laptop, a GPU
node and a Cloud TPU pod slice are in `longjax/train/trainer.py`.
"""
import importlib.util
import logging as pylogging
import os
import sys

from longjax import hostmem

if __name__ == '__main__':
  # Before JAX is imported (and its allocator used): restart once with glibc's
  # huge-page tunable; see longjax/hostmem.py. LONGJAX_HUGEPAGES=0 opts out.
  hostmem.reexec_with_hugepages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from longjax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/base.py (configs/x.py:arg passes an argument).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and the config go here; resumed from.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'decode'],
                          'train (resumes if the workdir has checkpoints), eval (evaluates '
                          'the latest checkpoint at config.eval_seq_len), or decode (generates '
                          'for the eval split and scores ROUGE / BLEU / exact match).')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Call jax.distributed.initialize()? auto: when a coordinator is given (flags below or '
    'JAX_COORDINATOR_ADDRESS), on Cloud TPU, or under SLURM / Open MPI with > 1 task.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process GPU or CPU runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = {'train': trainer.train_and_evaluate, 'eval': trainer.evaluate,
         'decode': trainer.decode_eval}


def _wants_distributed() -> bool:
  if _DISTRIBUTED.value != 'auto':
    return _DISTRIBUTED.value == 'on'
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(value is not None for value in given) or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if importlib.util.find_spec('libtpu') is not None:  # A Cloud TPU VM.
    return True
  tasks = os.environ.get('SLURM_NTASKS') or os.environ.get('OMPI_COMM_WORLD_SIZE') or '1'
  return int(tasks) > 1


class _WithoutOrbaxInfo(pylogging.Filter):
  """Orbax logs dozens of INFO lines per save; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_WithoutOrbaxInfo())
  if _wants_distributed():
    # Must come before anything touches a device; missing values are found
    # from the cluster environment (Cloud TPU metadata, SLURM, Open MPI).
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info('JAX process %d of %d, %d local devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.devices()[0].platform)
  logging.info('Large host allocations on transparent huge pages: %s.',
               'yes' if hostmem.is_on(os.environ) else 'no')
  MODES[_MODE.value](_CONFIG.value, _WORKDIR.value)


def _parse_flags(argv):
  """absl's parser, with an unknown --config.field reported as one clear line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    # config_flags raises these for an override of a field the config lacks;
    # their message names the field and suggests the nearest one.
    overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]  # AttributeError(KeyError(message)).
    message = str(error.args[0] if error.args else error).replace('\n', ' ')
    sys.stderr.write(f'FATAL Flags parsing error: unknown config field among '
                     f'{", ".join(overrides)}: {message}\n')
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
