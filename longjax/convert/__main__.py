"""Command line: Hugging Face checkpoints into longjax runs, and back.

    python -m longjax.convert --hf_dir=HF --workdir=OUT --config=configs/pretrain.py [--config.x=y]
    python -m longjax.main --config=OUT/imported_config.py --workdir=OUT --mode=eval  # or train
    python -m longjax.convert --workdir=OUT --to_hf=HF2 --config=OUT/imported_config.py

Import: the model block of `--config` (the task: data, tokenizer, schedule,
compute dtype, remat) takes the architecture of HF/config.json
(longjax/convert/architectures.py), and OUT gets a checkpoint at step 0 with
the HF weights, its config.json and OUT/imported_config.py, the config file to
pass to longjax.main (`--config=OUT/imported_config.py`, overrides as usual), so
every mode runs on it (training fine-tunes from it). `--config.model.attention.*`
overrides convert the attention (`layer_pattern=local,local,full`, `kind=global_local`:
its global projections start as copies of the local ones, as Longformer's). The task's tokenizer must have the model's
vocabulary. Export (`--to_hf`): the latest checkpoint of a run as config.json
and model.safetensors (Llama, Mistral for local attention, Qwen2 with q/k/v
biases, T5 and LongT5 for encoder-decoders; `--architecture` chooses). Errors name the file, key or tensor.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from longjax import cli
from longjax.convert import checkpoints
from longjax.convert.hf_files import HFFormatError
from longjax.train import run_identity, validation

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The task config (as longjax.main).',
                                          lock_config=True)
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'A Hugging Face model folder to import.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run: created by an import, read by --to_hf.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Export the run in --workdir to this folder.')
_ARCHITECTURE = flags.DEFINE_string('architecture', '', 'With --to_hf: LlamaForCausalLM, '
                                    'MistralForCausalLM or Qwen2ForCausalLM (default: the one '
                                    'the model is).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    if not _WORKDIR.value or bool(_HF_DIR.value) == bool(_TO_HF.value):
      raise cli.UserError('give --workdir and one of --hf_dir (import) or --to_hf (export).')
    if _HF_DIR.value:
      problem = checkpoints.workdir_in_use(_WORKDIR.value)
      if problem:
        raise cli.UserError(f'--workdir={_WORKDIR.value} {problem}')
      block, params = checkpoints.import_hf(_HF_DIR.value)
      spec, overrides = _config_given(sys.argv)
      config = checkpoints.with_model(_CONFIG.value, block, overrides)
      count = checkpoints.write_run(config, _WORKDIR.value, params)
      config_file = checkpoints.write_config_file(_WORKDIR.value, spec, overrides, block)
      logging.info('Imported %s (%s parameters) into %s as step 0. Evaluate, decode or fine-tune '
                   'it with: python -m longjax.main --config=%s --workdir=%s --mode=eval',
                   _HF_DIR.value, f'{count:,}', _WORKDIR.value, config_file, _WORKDIR.value)
    else:
      model, params = checkpoints.read_run(_CONFIG.value, _WORKDIR.value)
      written = checkpoints.export_hf(model, params, _TO_HF.value, _ARCHITECTURE.value)
      logging.info('Exported %s as %s into %s.', _WORKDIR.value, written['architectures'][0],
                   _TO_HF.value)
  except (cli.UserError, HFFormatError, run_identity.NotTrainedError) as error:
    cli.fatal([str(error)])
  except validation.ConfigError as error:
    cli.fatal(cli.config_error_lines(error))


def _config_given(argv) -> tuple[str, list[str]]:
  """(--config's value as a path, the --config.FIELD=VALUE overrides) of a command line."""
  argv = cli.with_config_resolved(argv)
  spec = next(a.split('=', 1)[1] for a in argv if a.startswith('--config='))
  return spec, [a[len('--config.'):] for a in argv if a.startswith('--config.')]


def _parse_flags(argv):
  try:
    return flags.FLAGS(cli.with_config_resolved(argv))
  except (cli.UserError, flags.Error) as error:
    cli.fatal([str(error)])


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
  sys.exit(0)
