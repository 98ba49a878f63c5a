"""Command line: python -m longjax.main --config=pretrain --workdir=DIR
[--mode=eval|decode|estimate|context_eval].

`--config` takes a config name (`pretrain`, `pretrain:local`: a file of the
packaged `longjax/configs/` or of `configs/` in the current directory) or a
path (`configs/pretrain.py:local`). Any config field can be overridden as
--config.x.y=value; the config is locked, so a misspelled field is an error.
`--help` lists the configs, attention kinds and modes; `--print_config` shows
every field. A bad config, a bad --workdir or a missing config file prints
FATAL lines naming the flag or field and the fix, and exits 1; bugs keep their
traceback. On Linux the process restarts itself once with transparent huge
pages for large host allocations (longjax/hostmem.py; LONGJAX_HUGEPAGES=0
opts out), and training with `model.remat` sets XLA's CPU scheduler so that
remat saves memory there (the same file). Launch commands for a laptop, a GPU
node and a Cloud TPU pod slice are in README.md, "Launching". The plumbing
(config names, --help's text, FATAL lines) is in longjax/cli.py.
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


class _WithoutTpuProbe(pylogging.Filter):
  """JAX logs "Unable to initialize backend 'tpu'" on every machine without libtpu.

  It reads like an error but only says there is no TPU, which the platform
  line says plainly. Where libtpu is installed the message is a real problem
  (a TPU in use, a broken driver) and stays.
  """

  def filter(self, record):
    return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


if importlib.util.find_spec('libtpu') is None:
  pylogging.getLogger('jax._src.xla_bridge').addFilter(_WithoutTpuProbe())

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from longjax import cli
from longjax import data
from longjax.train import checkpointing
from longjax.train import context_eval
from longjax.train import evaluation
from longjax.train import run_identity
from longjax.train import setup
from longjax.train import trainer
from longjax.train import validation
from longjax.train import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config name (pretrain, pretrain:local) or file (configs/pretrain.py:local); '
    'NAME:ARG passes ARG, an attention kind and/or a size.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and the config go here; resumed from.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'decode', 'estimate', 'context_eval'],
                          'train (resumes if the workdir has checkpoints), eval (evaluates '
                          'the latest checkpoint at config.eval_seq_len), decode (generates '
                          'for the eval split and scores ROUGE / BLEU / exact match), '
                          'estimate (compiles the train step and prints its memory per '
                          'device and whether it fits; nothing runs), or context_eval (loss '
                          'on fixed targets against the context before them).')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print every field of the resolved config (the config, its argument '
    'and the overrides; for eval/decode, the run saved in --workdir) and exit.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Call jax.distributed.initialize()? auto: when a coordinator is given (flags below or '
    'JAX_COORDINATOR_ADDRESS), on Cloud TPU, or under SLURM / Open MPI with > 1 task.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process GPU or CPU runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'train: fields of what the run is (model, tokenizer, dataset, '
    'seed) that a resume may change on purpose, e.g. model.attention.kind,seed; other '
    'settings may change with a warning.')
flags.mark_flags_as_required(['config'])

MODES = {'train': trainer.train_and_evaluate, 'eval': evaluation.evaluate,
         'decode': evaluation.decode_eval, 'estimate': trainer.estimate_memory,
         'context_eval': context_eval.context_eval}
TRAINING_MODES = ('train', 'estimate')  # They read the config given, not the workdir's.
MODE_HELP = {
    'train': 'train config.num_train_steps steps (the default); resumes from the workdir',
    'eval': "score the latest checkpoint at config.eval_seq_len, with the run's saved settings",
    'decode': 'generate for the eval split; ROUGE-1/2/L, BLEU, exact match',
    'estimate': 'compile the train step ahead of time; print its memory and whether it fits',
    'context_eval': 'loss on fixed eval targets against the context before them, with '
                    'bootstrap intervals (config.context_eval; writes DIR/context_eval/)',
}
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
  mode, workdir = _MODE.value, _WORKDIR.value
  try:
    if workdir is None and not (_PRINT_CONFIG.value and mode in TRAINING_MODES):
      raise cli.UserError('--workdir is required: the directory for checkpoints, metrics and '
                       'config.json (created if missing), e.g. --workdir=/tmp/run.')
    if _PRINT_CONFIG.value:
      config = _CONFIG.value
      if mode not in TRAINING_MODES:
        config = run_identity.evaluation_config(config, workdir, mode=mode)
      cli.print_config(config)
      return
    problem = setup.workdir_problem(workdir, create=mode in TRAINING_MODES)
    if problem:
      raise cli.UserError(f'--workdir={workdir} {problem}')
    remat = _CONFIG.value.model.remat if mode in TRAINING_MODES else 'none'
    scheduler_set = hostmem.use_remat_scheduler(remat)  # Before any device is touched.
    if _wants_distributed():
      # Must come before anything touches a device; missing values are found
      # from the cluster environment (Cloud TPU metadata, SLURM, Open MPI). A
      # loopback coordinator listens on loopback only (JAX's default is every interface).
      coordinator = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value,
                                 process_id=_PROCESS_ID.value,
                                 coordinator_bind_address=cli.coordinator_bind_address(coordinator))
    logging.info(cli.platform_line())
    if jax.process_count() > 1:
      logging.info('JAX process %d of %d, %d local devices.', jax.process_index(),
                   jax.process_count(), jax.local_device_count())
    logging.info('Large host allocations on transparent huge pages: %s.',
                 'yes' if hostmem.is_on(os.environ) else 'no')
    if scheduler_set:
      logging.info('model.remat=%s: XLA_FLAGS += --%s=false, so that recomputed activations '
                   'are freed on a CPU (longjax/hostmem.py; set the flag in XLA_FLAGS yourself '
                   'to choose).', remat, hostmem.CPU_SCHEDULER_FLAG)
    if mode == 'train':
      trainer.train_and_evaluate(_CONFIG.value, workdir,
                                 allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    else:
      MODES[mode](_CONFIG.value, workdir)
  except (cli.UserError, workdir_lock.WorkdirBusyError) as error:
    cli.fatal([str(error)])
  except (validation.ConfigError, data.DataConfigError) as error:
    cli.fatal(cli.config_error_lines(error))
  except (run_identity.NotTrainedError, checkpointing.CheckpointSaveError) as error:
    cli.fatal([str(error)])


def _parse_flags(argv):
  """absl's parser, with --help exiting 0 and every user error as clean FATAL lines."""
  rest = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  help_flags = [arg for arg in rest if arg.split('=')[0] in cli.HELP_FLAGS]
  if help_flags:
    sys.stdout.write(cli.help_text(MODE_HELP, full=any('full' in arg for arg in help_flags)))
    sys.exit(0)
  given = argv
  try:
    argv = cli.with_config_resolved(argv)
    return flags.FLAGS(argv)
  except cli.UserError as error:
    cli.fatal([str(error)])
  except flags.Error as error:
    problem = cli.config_file_problem(error)
    if problem:
      cli.fatal([f'{cli.config_arg(given)}: {problem}'])
    cli.fatal([f'Flags parsing error: {error}',
            'Pass --help to see the configs, attention kinds, modes and flags.'])
  except (AttributeError, KeyError) as error:
    # config_flags raises these for an override of a field the config lacks;
    # their message names the field and suggests the nearest one.
    overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]  # AttributeError(KeyError(message)).
    message = str(error.args[0] if error.args else error).replace('\n', ' ')
    cli.fatal([f'Flags parsing error: unknown config field among {", ".join(overrides)}: '
            f'{message}'])


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
