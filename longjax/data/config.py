"""Typed, validated data settings: the only configuration the data layer reads.

Nothing in `longjax/data` takes the ml-collections ConfigDict. The config is
read once, at the boundary, into these frozen values:

    data_config = DataConfig.from_config(config)   # train/validation.py does this
    tokenizer = data.get_tokenizer(data_config, workdir)
    train_iter = data.build_train_iterator(data_config, tokenizer)

and each function below it takes the piece it needs (`DataConfig`, or just its
`DatasetConfig`, `TokenizerConfig` or `SyntheticConfig`). So the data layer
cannot read the model's settings or the optimizer's, and every data-only check
runs here, once, before anything is built: all problems are reported together,
one per line, each as `config.<block>.<field> = <value>: <what is wrong>`.

Field names are the config's (longjax/configs/base.py documents each, and holds the
defaults; only `DatasetConfig.allow_download` has one here too, False, so that a
DatasetConfig made by hand never downloads), with one exception:
`DataConfig.synthetic_tasks` holds the `config.synthetic` block, because
`DataConfig.synthetic` answers "is the dataset a synthetic task?". `eval_seq_len`
is stored resolved (-1 in the config means `seq_len`), so no reader handles the
sentinel. Checks that need more than the config stay where that is known: the
dataset's features (`sources.check_feature_keys`), whether it is prepared and
its splits have examples (`sources.check_dataset`), a synthetic row's minimum
length (the task, at each length it is built for) and the batch split over
processes.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

# The RULER-style suite (longjax/data/ruler.py); the others are synthetic.py's.
RULER_TASKS = ('niah_single', 'niah_multikey', 'niah_multivalue', 'niah_multiquery',
               'variable_tracking', 'common_words', 'frequent_words')
SYNTHETIC_TASKS = ('passkey', 'associative_recall', 'selective_copy') + RULER_TASKS
# Tasks that hide needles in a haystack (config.synthetic.filler applies).
HAYSTACK_TASKS = ('passkey',) + RULER_TASKS[:5]
TOKENIZER_KINDS = ('bytes', 'sentencepiece')
PASSKEY_FILLERS = ('random', 'text')
# associative_recall keys are distinct lowercase letters.
MAX_RECALL_PAIRS = 26


def base_name(name: str) -> str:
  """'wmt14_translate/de-en:1.0.0' -> 'wmt14_translate'."""
  return name.split('/')[0].split(':')[0]


def is_synthetic(name: str) -> bool:
  return base_name(name) in SYNTHETIC_TASKS


def needle_depth(data_config) -> Optional[float]:
  """The fixed depth of the asked needle (synthetic.passkey_depth for passkey,
  synthetic.needle_depth for niah_single and niah_multikey), or None: uniform
  depths, or a task without one."""
  task = base_name(data_config.dataset.name)
  settings = data_config.synthetic_tasks
  depth = {'passkey': settings.passkey_depth, 'niah_single': settings.needle_depth,
           'niah_multikey': settings.needle_depth}.get(task, -1)
  return None if depth == -1 else float(depth)


class DataConfigError(ValueError):
  """Invalid data settings; `problems` lists each one (also the message's lines)."""

  def __init__(self, problems: list[str]):
    super().__init__('Invalid config:\n  ' + '\n  '.join(problems))
    self.problems = tuple(problems)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """`config.dataset`: which data, read how."""
  name: str
  data_dir: str
  split_train: str
  split_eval: str
  input_key: str
  target_key: str
  pack: bool
  num_workers: int
  prefetch: int
  verses_per_example: int
  # A tfds dataset not prepared in data_dir is downloaded (True) or refused (False, the default).
  allow_download: bool = False

  @property
  def synthetic(self) -> bool:
    """A synthetic task (generated, not read; always LM rows)."""
    return is_synthetic(self.name)

  @property
  def seq2seq(self) -> bool:
    """A target feature is named (synthetic tasks are LM even then)."""
    return bool(self.target_key) and not self.synthetic


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """`config.tokenizer`."""
  kind: str
  spm_model_path: str
  spm_vocab_size: int


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """`config.synthetic`: the synthetic tasks' settings (see synthetic.py)."""
  num_train_examples: int
  num_eval_examples: int
  passkey_digits: int
  passkey_depth: float
  filler: str
  num_pairs: int
  num_queries: int
  copy_tokens: int
  needle_depth: float
  num_needles: int
  num_values: int
  num_chains: int
  hops: int
  num_common: int
  word_repeats: int
  num_frequent: int
  global_answers: bool


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the data layer reads; validated when made.

  batch_size is the global batch (all processes together); eval_seq_len is
  resolved (never -1).
  """
  dataset: DatasetConfig
  tokenizer: TokenizerConfig
  synthetic_tasks: SyntheticConfig
  seq_len: int
  target_len: int
  eval_seq_len: int
  batch_size: int
  seed: int

  def __post_init__(self):
    problems = _problems(self)
    if problems:
      raise DataConfigError(problems)

  @property
  def synthetic(self) -> bool:
    return self.dataset.synthetic

  @property
  def seq2seq(self) -> bool:
    return self.dataset.seq2seq

  @classmethod
  def from_config(cls, config) -> DataConfig:
    """Reads the data fields of a full config (ConfigDict or nested dict); validates.

    Raises DataConfigError (a ValueError) naming every missing, mistyped or
    invalid field at once.
    """
    problems = []
    read = _reader(config, problems)

    def block(cls, name):
      return {field.name: read(name, field.name, _TYPES[field.type])
              for field in dataclasses.fields(cls)}

    dataset = block(DatasetConfig, 'dataset')
    tokenizer = block(TokenizerConfig, 'tokenizer')
    synthetic = block(SyntheticConfig, 'synthetic')
    top = {field: read('', field, int)
           for field in ('seq_len', 'target_len', 'eval_seq_len', 'batch_size', 'seed')}
    if problems:  # Missing or mistyped: nothing to check the values of.
      raise DataConfigError(problems)
    if top['eval_seq_len'] == -1:
      top['eval_seq_len'] = top['seq_len']
    return cls(dataset=DatasetConfig(**dataset), tokenizer=TokenizerConfig(**tokenizer),
               synthetic_tasks=SyntheticConfig(**synthetic), **top)


# The fields' annotations (strings, under `from __future__ import annotations`)
# -> the type a config value is read as.
_TYPES = {'int': int, 'float': float, 'bool': bool, 'str': str}


def _reader(config, problems: list[str]):
  """read(block, field, type): the value of config[block][field], or None with a problem."""

  def read(block, field, kind):
    path = f'{block}.{field}' if block else field
    try:
      value = (config[block] if block else config)[field]
    except (KeyError, AttributeError, TypeError):
      problems.append(f'config.{path} is missing: the data layer reads it (longjax/configs/base.py '
                      f'documents it).')
      return None
    if kind is str:
      if not isinstance(value, str):
        problems.append(f'config.{path} = {value!r}: must be a string.')
      return value
    if kind is bool:
      if not isinstance(value, bool):
        problems.append(f'config.{path} = {value!r}: must be True or False.')
      return value
    if not isinstance(value, numbers.Real):
      problems.append(f'config.{path} = {value!r}: must be a number.')
      return None
    if kind is int and int(value) != value:
      problems.append(f'config.{path} = {value!r}: must be a whole number.')
    # Stored as the field's type: plain Python numbers, whatever the config held.
    return kind(value)

  return read


def _problems(data_config: DataConfig) -> list[str]:
  """Every invalid data setting, as `config.<field> = <value>: <message>` lines."""
  problems = []
  dataset, tokenizer = data_config.dataset, data_config.tokenizer
  settings = data_config.synthetic_tasks

  def check(condition, path, value, message):
    if not condition:
      problems.append(f'config.{path} = {value!r}: {message}')

  for field in ('seq_len', 'batch_size'):
    check(getattr(data_config, field) >= 1, field, getattr(data_config, field), 'must be >= 1.')
  check(data_config.eval_seq_len >= 1, 'eval_seq_len', data_config.eval_seq_len,
        'must be >= 1, or -1 for seq_len.')
  if dataset.seq2seq:
    check(data_config.target_len >= 1, 'target_len', data_config.target_len,
          'must be >= 1 (the seq2seq target length).')

  check(dataset.num_workers >= 0, 'dataset.num_workers', dataset.num_workers,
        'must be >= 0 (grain worker processes; 0 reads in the main process).')
  check(dataset.prefetch >= 0, 'dataset.prefetch', dataset.prefetch,
        'must be >= 0 (batches prefetched on a background thread; 0 = none).')

  check(tokenizer.kind in TOKENIZER_KINDS, 'tokenizer.kind', tokenizer.kind,
        "must be 'bytes' or 'sentencepiece'.")
  if tokenizer.kind == 'sentencepiece' and not tokenizer.spm_model_path:
    check(tokenizer.spm_vocab_size >= 1, 'tokenizer.spm_vocab_size', tokenizer.spm_vocab_size,
          'must be >= 1 (pieces of the SentencePiece model trained into the workdir).')

  # A task's settings matter only when the dataset is that task.
  task = base_name(dataset.name)
  if task == 'passkey':
    check(settings.passkey_digits >= 1, 'synthetic.passkey_digits', settings.passkey_digits,
          'must be >= 1.')
    depth = settings.passkey_depth
    check(depth == -1 or 0.0 <= depth <= 1.0, 'synthetic.passkey_depth', depth,
          'must be in [0, 1] or -1.')
  if task == 'associative_recall':
    pairs, queries = settings.num_pairs, settings.num_queries
    needs = (f'associative_recall needs 1 <= num_queries ({queries}) <= num_pairs ({pairs}) '
             f'<= {MAX_RECALL_PAIRS}.')
    check(1 <= pairs <= MAX_RECALL_PAIRS, 'synthetic.num_pairs', pairs, needs)
    if 1 <= pairs <= MAX_RECALL_PAIRS:
      check(1 <= queries <= pairs, 'synthetic.num_queries', queries, needs)
  if task in HAYSTACK_TASKS:
    check(settings.filler in PASSKEY_FILLERS, 'synthetic.filler', settings.filler,
          "must be 'random' or 'text'.")
  if task in ('niah_single', 'niah_multikey'):
    depth = settings.needle_depth
    check(depth == -1 or 0.0 <= depth <= 1.0, 'synthetic.needle_depth', depth,
          'must be in [0, 1] or -1.')
  if task in ('niah_multikey', 'niah_multiquery'):
    check(settings.num_needles >= 1, 'synthetic.num_needles', settings.num_needles,
          'must be >= 1.')
  if task == 'niah_multiquery':
    check(1 <= settings.num_queries <= settings.num_needles, 'synthetic.num_queries',
          settings.num_queries, f'niah_multiquery asks 1 to num_needles '
          f'({settings.num_needles}) of its needles.')
  for name, field in (('niah_multivalue', 'num_values'), ('variable_tracking', 'num_chains'),
                      ('variable_tracking', 'hops'), ('common_words', 'num_common'),
                      ('common_words', 'word_repeats'), ('frequent_words', 'num_frequent')):
    if task == name:
      value = getattr(settings, field)
      least = 2 if field == 'word_repeats' else 1
      check(value >= least, f'synthetic.{field}', value, f'must be >= {least}.')
  if task == 'selective_copy':
    check(settings.copy_tokens >= 1, 'synthetic.copy_tokens', settings.copy_tokens,
          'must be >= 1.')
  return problems
