"""Eval and decode take the run from the workdir's config.json (longjax/train/run_identity.py),
and a bad --workdir is found before anything is built (setup.workdir_problem)."""
import errno
import json
import os

import pytest

from tests.train import train_testing
from longjax.train import run_identity
from longjax.train import setup
from longjax.train import validation


def _save(workdir, config):
  """config.json as training writes it (trainer._recorded_config, to_json_best_effort)."""
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def test_a_different_model_is_refused_naming_each_field(tmp_path):
  _save(tmp_path, train_testing.tiny_config(model__vocab_size=300))
  given = train_testing.tiny_config(model__attention__kind='local', synthetic__passkey_digits=4)
  with pytest.raises(run_identity.RunIdentityError) as error:
    run_identity.evaluation_config(given, tmp_path, mode='decode')
  assert isinstance(error.value, validation.ConfigError)  # main prints it as FATAL lines.
  assert error.value.problems == ("config.model.attention.kind: saved 'full', given 'local'",
                                  'config.synthetic.passkey_digits: saved 3, given 4')
  message = str(error.value)
  assert "--mode=decode uses the trained run's settings" in message
  assert ('--config.model.attention.kind=full --config.synthetic.passkey_digits=3'
          in message)  # The fix, as flags.
  # The vocabulary is recorded from the tokenizer, never compared.
  assert 'vocab_size' not in message


def test_the_schedule_is_the_saved_one_and_not_refused(tmp_path):
  """Steps, learning rate, intervals and the seed shape training, not the trained model."""
  _save(tmp_path, train_testing.tiny_config(num_train_steps=2, eval_every_steps=0))
  given = train_testing.tiny_config(learning_rate=1.0, seed=3)  # 20 steps, eval every 10.
  config = run_identity.evaluation_config(given, tmp_path)
  assert (config.num_train_steps, config.eval_every_steps, config.learning_rate,
          config.seed) == (2, 0, train_testing.tiny_config().learning_rate, 0)


def test_evaluation_fields_come_from_the_given_config(tmp_path):
  saved = train_testing.tiny_config(axis_rules=(('mlp', 'tensor'),),
                                    model__attention__layer_pattern=('local', 'full'))
  _save(tmp_path, saved)
  given = train_testing.tiny_config(
      eval_seq_len=96, model__max_len=256, num_eval_steps=3, batch_size=4,
      decode__beam_size=2, mesh__data=1, dataset__split_eval='train', dataset__data_dir='/d',
      axis_rules=(), model__attention__layer_pattern=('local,full',))  # The flag's spelling.
  config = run_identity.evaluation_config(given, tmp_path)
  assert (config.eval_seq_len, config.model.max_len, config.num_eval_steps, config.batch_size,
          config.decode.beam_size, config.mesh.data, config.dataset.split_eval,
          config.dataset.data_dir) == (96, 256, 3, 4, 2, 1, 'train', '/d')
  assert config.axis_rules == ()
  # The identity is the saved one, back in its tuple type.
  assert config.model.attention.layer_pattern == ('local', 'full')
  assert run_identity.flatten(config) == run_identity.flatten(
      run_identity.merged(given, run_identity.flatten(saved), may_change=run_identity.EVALUATION
                          + ('model.max_len',)))


def test_a_depth_probe_and_context_eval_settings_may_change(tmp_path):
  """The needle's depth (the needle-depth x length probe) and context_eval.* change
  what is measured, not the run: the rest of synthetic.* stays the run's."""
  _save(tmp_path, train_testing.tiny_config())
  given = train_testing.tiny_config(synthetic__passkey_depth=0.25,
                                    synthetic__needle_depth=0.75,
                                    context_eval__contexts='8,16')
  config = run_identity.evaluation_config(given, tmp_path)
  assert (config.synthetic.passkey_depth, config.synthetic.needle_depth,
          config.context_eval.contexts) == (0.25, 0.75, '8,16')
  with pytest.raises(run_identity.RunIdentityError, match='synthetic.num_needles'):
    run_identity.evaluation_config(train_testing.tiny_config(synthetic__num_needles=9), tmp_path)


def test_saved_tuples_come_back_as_tuples(tmp_path):
  _save(tmp_path, train_testing.tiny_config(axis_rules=(('mlp', 'tensor'), ('heads', None))))
  config = run_identity.merged(train_testing.tiny_config(),
                               run_identity.flatten(run_identity.read_saved(tmp_path)),
                               may_change=())
  assert config.axis_rules == (('mlp', 'tensor'), ('heads', None))


def test_max_len_is_the_models_own_with_learned_positions(tmp_path):
  _save(tmp_path, train_testing.tiny_config(model__positions='learned'))
  given = train_testing.tiny_config(model__positions='learned', model__max_len=256)
  with pytest.raises(run_identity.RunIdentityError, match='config.model.max_len: saved 128'):
    run_identity.evaluation_config(given, tmp_path)


def test_a_field_newer_than_the_run_is_not_a_difference():
  saved = run_identity.flatten(train_testing.tiny_config())
  del saved['dataset.prefetch'], saved['seed']
  given = run_identity.flatten(train_testing.tiny_config(seed=5))
  assert run_identity.differences(saved, given, may_change=()) == []


def test_without_a_saved_config_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint to evaluate.*train first'):
    run_identity.evaluation_config(train_testing.tiny_config(), tmp_path)


def test_workdir_problems_are_named(tmp_path, monkeypatch):
  assert setup.workdir_problem(tmp_path / 'new', create=True) is None
  assert (tmp_path / 'new').is_dir() and os.listdir(tmp_path / 'new') == []  # No probe left.
  (tmp_path / 'file').write_text('')
  assert setup.workdir_problem(tmp_path / 'file', create=True).startswith('is a file')
  assert setup.workdir_problem(tmp_path / 'missing', create=False).startswith('does not exist')

  def no_permission(*unused_args, **unused_kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied')

  monkeypatch.setattr(setup, 'open', no_permission, raising=False)
  assert setup.workdir_problem(tmp_path, create=True) == (
      'is not writable (Permission denied); pass a directory you can write to.')
  monkeypatch.undo()

  full = os.statvfs(tmp_path)
  monkeypatch.setattr(os, 'statvfs', lambda path: os.statvfs_result(
      tuple(0 if i == 4 else v for i, v in enumerate(full))))  # f_bavail = 0.
  assert setup.workdir_problem(tmp_path, create=True).startswith(
      'is on a full disk (0 bytes free)')


def test_read_saved_reads_what_training_writes(tmp_path):
  config = train_testing.tiny_config()
  _save(tmp_path, config)
  written = json.loads(config.to_json_best_effort())
  saved = run_identity.read_saved(tmp_path)
  # The deprecated spellings (at their unset values here) are dropped on reading.
  assert written['model'].pop('kind') == ''
  assert written['model']['attention'].pop('block_size') == -1
  assert saved == written


def test_a_run_saved_with_the_old_spellings_is_read_in_the_new_ones(tmp_path):
  """config.json of a run from before model.kind -> arch and block_size -> summary_block."""
  from longjax.configs import summarize  # pylint: disable=g-import-not-at-top
  old = json.loads(summarize.get_config('transient_global').to_json_best_effort())
  model = old['model']
  model['kind'] = model.pop('arch')
  attention = model['attention']
  for field in ('summary_block', 'level0_block', 'chunk_size'):
    attention.pop(field)
  attention['block_size'] = 32  # The given config below has 16.
  with open(tmp_path / 'config.json', 'w', encoding='utf-8') as f:
    json.dump(old, f)
  saved = run_identity.read_saved(str(tmp_path))
  assert saved['model']['arch'] == 'encoder_decoder' and 'kind' not in saved['model']
  assert saved['model']['attention']['summary_block'] == 32
  with pytest.raises(run_identity.RunIdentityError, match=r'summary_block: saved 32, given 16'):
    run_identity.evaluation_config(summarize.get_config('transient_global'), str(tmp_path))
  given = summarize.get_config('transient_global')
  for field in ('summary_block', 'level0_block', 'chunk_size'):
    given.model.attention[field] = 32
  merged = run_identity.evaluation_config(given, str(tmp_path))
  assert merged.model.arch == 'encoder_decoder' and merged.model.attention.summary_block == 32
