"""A training iterator restored from its saved state continues with exactly the same batches."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data import data_testing
from longjax import data
from longjax.data import tokenizers

TOKENIZER = tokenizers.ByteTokenizer()

CASES = {
    'pystdlib_packed_prefetch': dict(dataset__prefetch=2),
    'pystdlib_unpacked': dict(dataset__pack=False),
    'bible_seq2seq': dict(dataset__name='longjax_bible_en_es', dataset__input_key='en',
                          dataset__target_key='es'),
    'passkey': dict(dataset__name='passkey', seq_len=48),
    'associative_recall': dict(dataset__name='associative_recall'),
}


def train_iterator(config):
  return data.build_train_iterator(config, TOKENIZER, process_index=0, process_count=1)


def assert_resumes_exactly(config, skip, count=4):
  iterator = train_iterator(config)
  data_testing.take(iterator, skip)
  state = json.loads(json.dumps(iterator.get_state()))  # What a checkpoint stores.
  expected = data_testing.take(iterator, count)
  resumed = train_iterator(config)
  resumed.set_state(state)
  data_testing.assert_batches_equal(expected, data_testing.take(resumed, count))
  return expected


@pytest.mark.parametrize('case', sorted(CASES))
def test_restored_iterator_continues_with_the_same_batches(case, make_data_config):
  if case.startswith('bible') and not data_testing.sword_modules_installed():
    pytest.skip('needs the SWORD Bible packages')
  config = make_data_config(**CASES[case])
  expected = assert_resumes_exactly(config, skip=7)
  # Same config, fresh iterator: the same stream; another seed: another stream.
  fresh = data_testing.take(train_iterator(config), 11)[7:]
  data_testing.assert_batches_equal(expected, fresh)
  other = data_testing.take(train_iterator(dataclasses.replace(config, seed=1)), 11)[7:]
  assert not all((a['inputs'] == b['inputs']).all() for a, b in zip(expected, other))


def test_restore_across_epochs_and_reshuffle(make_data_config):
  # allow_download: under tfds' mock, "downloading" makes the mock data (nothing is fetched).
  config = make_data_config(dataset__name='wmt14_translate/de-en', dataset__input_key='de',
                            dataset__target_key='en', seq_len=24, batch_size=4,
                            dataset__allow_download=True)
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    batches = data_testing.take(train_iterator(config), 6)  # Three epochs of 8.
    assert_resumes_exactly(config, skip=3)  # Saved mid-epoch 2, resumed into epoch 3.
  rows = [tuple(row) for batch in batches for row in batch['inputs']]
  epochs = [rows[0:8], rows[8:16], rows[16:24]]
  assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)
  assert len(set(epochs[0])) == 8
  assert epochs[0] != epochs[1] != epochs[2]  # Reshuffled every epoch.


def test_orbax_checkpoint_manager_round_trip(make_data_config, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = make_data_config(dataset__prefetch=2)
  iterator = train_iterator(config)
  data_testing.take(iterator, 5)
  model_state = {'step': jnp.asarray(5), 'weights': jnp.arange(6.0).reshape(2, 3)}
  manager = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(max_to_keep=2))
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(model_state),
                                          data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = data_testing.take(iterator, 3)
  manager.close()

  restored_iterator = train_iterator(config)
  manager = ocp.CheckpointManager(str(tmp_path))
  assert manager.latest_step() == 5
  restored = manager.restore(5, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(model_state),
      data=grain.checkpoint.CheckpointRestore(restored_iterator)))
  manager.close()
  assert restored['data'] is restored_iterator  # Restored in place.
  np.testing.assert_array_equal(restored['state']['weights'], model_state['weights'])
  data_testing.assert_batches_equal(expected, data_testing.take(restored_iterator, 3))
