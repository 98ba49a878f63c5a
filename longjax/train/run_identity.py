"""What makes a trained run the run it is, and what a later command may change.

Training writes the run's whole config to `workdir/config.json`. That file,
not whatever config a later command is given, says which model, tokenizer
and data the checkpoints belong to. `--mode=eval` and `--mode=decode` rebuild
the run from it (`evaluation_config`) and take from the given config only the
fields listed in EVALUATION; a different value in a field of IDENTITY (the
model, tokenizer and data) is refused, naming each field, before anything is
built, and the schedule (everything else: optimizer, steps, intervals) is the
saved one, with a log line naming what was given differently. Without this, evaluating a
full-attention checkpoint with `--config=configs/pretrain.py:local` built a
local-attention model on those weights and said nothing.

The pieces are general on purpose: `read_saved`, `flatten`, `differences`
and `merged` take the list of fields that may change, so another command
(resuming training, say) can classify the fields its own way with them.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
import ml_collections

from longjax import files
from longjax.models import config as model_config_lib
from longjax.train import validation

CONFIG_FILE = 'config.json'

# Where the data is read from and how the arrays are laid out: the same run on
# another machine, mesh or data mount.
PLACEMENT = ('mesh', 'axis_rules', 'dataset.data_dir', 'dataset.num_workers',
             'dataset.prefetch', 'dataset.allow_download')
# What an evaluation of a finished run may choose: how long, on which split,
# how much, in what batches, and how to decode. A name covers its sub-fields
# ('decode' is every decode.* field).
EVALUATION = ('eval_seq_len', 'dataset.split_eval', 'num_eval_steps', 'batch_size',
              'decode', 'context_eval',
              # Where the eval's needle sits (the needle-depth x length probe of a
              # haystack task): the eval rows change, not what the run trained on.
              'synthetic.needle_depth', 'synthetic.passkey_depth') + PLACEMENT
# Longer evaluation than model.max_len needs a higher max_len, which changes
# nothing the run trained unless positions are learned (a table of max_len rows).
EVALUATION_IF = {
    'model.max_len': lambda saved: saved.get('model.positions') != 'learned',
}
# What the trained run *is*: its model, its tokenizer, its data and how that
# was cut. A later command that changes one of these would pair the
# checkpoints with another model or other data, so it is refused. Every other
# field (the schedule: optimizer, steps, intervals, seed) shapes how the run
# was trained, not what it is: evaluation takes the saved value and says so.
IDENTITY = ('model', 'tokenizer', 'dataset', 'synthetic', 'seq_len', 'target_len')
# Recorded from what the run built, not chosen: the vocabulary is the
# tokenizer's (config.json holds it; the given config holds the default).
DERIVED = ('model.vocab_size',)
# Fields with several spellings of one value, compared by their meaning.
_MEANING: Mapping[str, Callable[[Any], Any]] = {
    'model.attention.layer_pattern': model_config_lib.parse_layer_pattern,
}


class NotTrainedError(FileNotFoundError):
  """The workdir holds no trained run (no config.json, or no checkpoint)."""


class RunIdentityError(validation.ConfigError):
  """The given config changes fields of the trained run that may not change."""


@dataclasses.dataclass(frozen=True)
class Difference:
  field: str  # Dotted, without 'config.': 'model.attention.kind'.
  saved: Any  # As JSON reads it back (tuples are lists).
  given: Any

  def __str__(self):
    return f'config.{self.field}: saved {self.saved!r}, given {self.given!r}'


def read_saved(workdir: str) -> dict:
  """The config a run was trained with, as the JSON `config.json` holds."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise NotTrainedError(
        f'No checkpoint to evaluate in {workdir}: it has no {CONFIG_FILE} (training writes '
        f'one); train first with the same --workdir.') from None
  if isinstance(saved.get('model'), dict):
    # A run saved before a rename (model.kind, attention.block_size) is read in today's
    # spelling, so that its settings are compared and restored, not defaulted.
    saved['model'] = model_config_lib.upgraded(saved['model'])
  return saved


def flatten(tree, *, as_json: bool = True) -> dict[str, Any]:
  """{dotted field: value} of a ConfigDict or a nested dict.

  as_json: the values as config.json holds them (tuples become lists), so that
  a given config and a saved one compare equal where they mean the same.
  """
  if as_json and isinstance(tree, ml_collections.ConfigDict):
    tree = json.loads(tree.to_json_best_effort())
  out = {}
  for key, value in tree.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update({f'{key}.{field}': leaf
                  for field, leaf in flatten(value, as_json=as_json).items()})
    else:
      out[key] = value
  return out


def covers(names: Iterable[str], field: str) -> bool:
  """Whether `field` is one of `names` or below one ('decode' covers 'decode.top_k')."""
  return any(field == name or field.startswith(name + '.') for name in names)


def differences(saved: Mapping[str, Any], given: Mapping[str, Any], *,
                may_change: Iterable[str],
                may_change_if: Optional[Mapping[str, Callable]] = None) -> list[Difference]:
  """The fields of `given` that differ from `saved` and may not (both flattened), by name.

  may_change_if: {field: condition(saved)}, fields that may change where the
  condition holds for the saved config. A field only `given` has is new since the run was trained: the run used
  what is now its default, so it is not a difference. DERIVED fields are
  never compared.
  """
  may_change = tuple(may_change)
  found = []
  for field, value in given.items():
    if field not in saved or covers(DERIVED, field) or covers(may_change, field):
      continue
    condition = (may_change_if or {}).get(field)
    if condition is not None and condition(saved):
      continue
    same = _MEANING.get(field, lambda x: x)
    if same(saved[field]) != same(value):
      found.append(Difference(field, saved[field], value))
  return sorted(found, key=lambda difference: difference.field)


def merged(given: ml_collections.ConfigDict, saved: Mapping[str, Any], *,
           may_change: Iterable[str]) -> ml_collections.ConfigDict:
  """`given` with every field outside `may_change` set to its `saved` value.

  Built on `given`'s structure (and so its types: JSON's lists go back into
  tuple fields like model.attention.layer_pattern and axis_rules as tuples).
  Fields only `saved` has are from an older version and are left out.
  """
  may_change = tuple(may_change)
  result = copy.deepcopy(given)
  current = flatten(result)
  with result.unlocked():
    for field, value in saved.items():
      if field not in current or covers(may_change, field):
        continue
      *parents, leaf = field.split('.')
      node = result
      for parent in parents:
        node = node[parent]
      node[leaf] = _like(node[leaf], value)
  unknown = sorted(set(saved) - set(current))
  if unknown:
    logging.warning('The saved config has fields this version does not read (ignored): %s.',
                    ', '.join(unknown))
  return result


def evaluation_config(config: ml_collections.ConfigDict, workdir: str, *,
                      mode: str = 'eval') -> ml_collections.ConfigDict:
  """The trained run's config with the evaluation choices of `config`.

  Raises NotTrainedError without a saved config, and RunIdentityError
  (listing every field, the saved and the given value) when `config` changes
  anything outside EVALUATION.
  """
  saved = flatten(read_saved(workdir))
  changed = differences(saved, flatten(config), may_change=EVALUATION,
                        may_change_if=EVALUATION_IF)
  found = [difference for difference in changed if covers(IDENTITY, difference.field)]
  ignored = [difference for difference in changed if not covers(IDENTITY, difference.field)]
  if ignored:
    logging.info('--mode=%s takes the trained run\'s schedule, not the given one: %s.', mode,
                 '; '.join(map(str, ignored)))
  if found:
    saved_flags = ' '.join(_as_flag(difference.field, difference.saved) for difference in found)
    raise RunIdentityError(
        [str(difference) for difference in found],
        heading=(f"--mode={mode} uses the trained run's settings "
                 f'({os.path.join(workdir, CONFIG_FILE)}); the given config changes what '
                 f'the run is (its model, tokenizer or data):'),
        advice=(f'Drop those overrides, or pass the config file the run was trained with '
                f'(the saved values as flags: {saved_flags}).\n'
                f'Evaluation may change only {", ".join(_described(EVALUATION))}, and '
                f"model.max_len unless model.positions is 'learned'."))
  allowed = EVALUATION + tuple(field for field, condition in EVALUATION_IF.items()
                               if condition(saved))
  return merged(config, saved, may_change=allowed)


def _like(current, value):
  """A JSON value back in the type of the field it came from (lists into tuples)."""
  return _tuples(value) if isinstance(current, tuple) else value


def _tuples(value):
  return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def _described(names) -> list[str]:
  """'decode' -> 'decode.*' for the sections among the names."""
  sections = ('mesh', 'decode')
  return [f'{name}.*' if name in sections else name for name in names]


def _as_flag(field: str, value) -> str:
  if isinstance(value, list):
    return f'"--config.{field}={_tuples(value)!r}"'
  return f'--config.{field}={value}'


# Resuming training -----------------------------------------------------------
# What a resumed run may change: its identity (the model, tokenizer, data and
# its preprocessing, the seed) only when --allow_config_change names the
# field; its placement freely; everything else (the schedule: steps, learning
# rate, batch, seq_len, intervals, clipping) with a warning, recorded in
# config_history.jsonl. Without this a full-attention run resumed as local
# attention, and a changed seed or dataset was taken for a corrupt checkpoint
# (reliability audit, M2 and H2).
RESUME_IDENTITY = ('model', 'tokenizer', 'dataset', 'synthetic', 'target_len', 'seed')
# Fields whose change makes the saved position in the data stream meaningless
# (restoring it fails, or lands elsewhere): an allowed change restarts the
# stream instead. (A new seq_len or batch size keeps the position.)
DATA_STREAM = ('tokenizer', 'dataset', 'synthetic', 'target_len', 'seed')
HISTORY_FILE = 'config_history.jsonl'


@dataclasses.dataclass(frozen=True)
class Resume:
  """What a resume changes: every accepted difference, and whether the data stream restarts."""
  changed: tuple[Difference, ...]
  restart_data: bool


def resume_check(config: ml_collections.ConfigDict, workdir: str, *,
                 allow: Iterable[str] = ()) -> Optional[Resume]:
  """Compares the config of a resumed run with the saved one, before anything is restored.

  Returns None when the workdir has no saved config (nothing to compare), else
  the accepted changes. Raises RunIdentityError naming every identity field
  that differs (saved and given values) and is not in `allow`.
  """
  try:
    saved = flatten(read_saved(workdir))
  except NotTrainedError:
    logging.warning('%s has checkpoints but no %s: the resumed config cannot be checked '
                    'against the one that trained them.', workdir, CONFIG_FILE)
    return None
  allow = tuple(allow)
  unknown = [field for field in allow if not any(covers((field,), name) for name in saved)]
  changed = differences(saved, flatten(config), may_change=PLACEMENT)
  refused = [d for d in changed if covers(RESUME_IDENTITY, d.field) and not covers(allow, d.field)]
  if refused or unknown:
    saved_flags = ' '.join(_as_flag(d.field, d.saved) for d in refused)
    problems = [str(d) for d in refused] + [
        f'--allow_config_change={field}: no such field in the saved config' for field in unknown]
    raise RunIdentityError(
        problems,
        heading=(f'Resuming {workdir} with a config that changes what the run is (its model, '
                 f'tokenizer, data or seed; saved in {os.path.join(workdir, CONFIG_FILE)}); '
                 f'nothing was restored or moved:'),
        advice=(f'Resume with the saved values ({saved_flags or "drop the overrides"}), or '
                f'name the fields to change on purpose: --allow_config_change='
                f'{",".join(d.field for d in refused) or "FIELD"}; or use a new --workdir.'))
  schedule = [d for d in changed if not covers(RESUME_IDENTITY, d.field)]
  if schedule:
    logging.warning('Resuming with changed settings (recorded in %s): %s.', HISTORY_FILE,
                    '; '.join(map(str, schedule)))
  allowed = [d for d in changed if covers(RESUME_IDENTITY, d.field)]
  if allowed:
    logging.warning('Resuming with identity changes allowed by --allow_config_change: %s.',
                    '; '.join(map(str, allowed)))
  restart = any(covers(DATA_STREAM, d.field) for d in changed)
  if restart:
    logging.warning('The data settings changed: the training data stream starts again from '
                    'its beginning instead of the saved position.')
  return Resume(tuple(changed), restart)


def record_start(config: ml_collections.ConfigDict, workdir: str, *, step: int,
                 resume: Optional[Resume]) -> None:
  """After a successful restore (or a fresh start): config.json becomes this
  config, and config_history.jsonl gains a line (the whole config for a fresh
  start; the changed fields, saved and given, for a resume)."""
  record = dict(time=datetime.datetime.now().isoformat(timespec='seconds'), step=step)
  if step == 0:
    record.update(event='start', config=flatten(config))
  else:
    record.update(event='resume', changed={
        d.field: dict(saved=d.saved, given=d.given) for d in (resume.changed if resume else ())})
  with open(os.path.join(workdir, HISTORY_FILE), 'a', encoding='utf-8') as f:
    f.write(json.dumps(record, sort_keys=True, default=str) + '\n')
    f.flush()
    os.fsync(f.fileno())
  files.write_atomically(os.path.join(workdir, CONFIG_FILE),
                         config.to_json_best_effort(indent=2, sort_keys=True))
