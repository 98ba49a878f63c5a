"""The embedded datasets through the whole pipeline, as the default configs use them."""
import numpy as np

from tests.data.data_testing import requires_sword
from longjax import data
from longjax.data import sources
from longjax.data import tokenizers

TOKENIZER = tokenizers.ByteTokenizer()


def test_default_pretraining_batches(make_config, make_data_config):
  config = make_data_config()  # longjax_pystdlib, byte tokens, packed.
  assert config.dataset.name == 'longjax_pystdlib' and not config.seq2seq
  batch = next(data.build_train_iterator(config, TOKENIZER, process_index=0, process_count=1))
  assert set(batch) == {'inputs', 'targets', 'weights', 'segment_ids', 'positions', 'global_mask'}
  assert batch['inputs'].shape == (4, 64)
  assert batch['inputs'].max() < make_config().model.vocab_size == TOKENIZER.vocab_size
  eval_batch = next(iter(data.build_eval_iterator(config, TOKENIZER, seq_len=128, process_index=0,
                                                  process_count=1)))
  assert eval_batch['inputs'].shape == (4, 128)
  # Validation files are held out: none of the first eval windows appears in training text.
  train = sources.get_data_source(config.dataset, 'train')
  train_text = b'\0'.join(train[i]['text'] for i in range(len(train)))
  windows = [bytes((row[row > 2] - 3).astype(np.uint8)) for row in eval_batch['inputs']]
  assert not any(window in train_text for window in windows if len(window) > 100)


def test_summarization_on_pydocs(make_data_config):
  config = make_data_config(dataset__name='longjax_pydocs', dataset__input_key='source',
                            dataset__target_key='docstring', seq_len=512, target_len=64)
  batch = next(iter(data.build_eval_iterator(config, TOKENIZER, process_index=0, process_count=1,
                                             with_text=True)))
  builder = sources.get_builder(config.dataset)  # Built by the line above.
  num_pairs = sum(split.num_examples for split in builder.info.splits.values())
  assert 7_000 < num_pairs < 10_000  # 8,601 on CPython 3.11.
  for row in range(4):
    source, docstring = batch['inputs_text'][row], batch['targets_text'][row]
    assert docstring and docstring not in source
    target = batch['targets'][row][batch['weights'][row] > 0]
    assert bytes((target[:-1] - 3).astype(np.uint8)) == docstring.encode('utf-8')[:63]


@requires_sword
def test_translation_on_the_bible(make_data_config):
  config = make_data_config(dataset__name='longjax_bible_en_es', dataset__input_key='en',
                            dataset__target_key='es', seq_len=256, target_len=256,
                            dataset__verses_per_example=1)
  batch = next(iter(data.build_eval_iterator(config, TOKENIZER, process_index=0,
                                             process_count=1, with_text=True)))
  validation = sources.get_data_source(config.dataset, 'validation')
  first = validation[0]
  assert batch['inputs_text'][0] == first['en'].decode('utf-8')
  assert batch['targets_text'][0] == first['es'].decode('utf-8')
  assert TOKENIZER.decode(batch['targets'][0]) == batch['targets_text'][0]
  train = next(data.build_train_iterator(config, TOKENIZER, process_index=0, process_count=1))
  assert train['decoder_inputs'].shape == (4, 256)
