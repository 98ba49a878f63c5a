"""longjax data: tokenizers, datasets and the batch pipelines the trainer calls.

    data_config = DataConfig.from_config(config)  # typed and checked, once
    tokenizer = get_tokenizer(data_config, workdir)
    train_iter = build_train_iterator(data_config, tokenizer)       # infinite, checkpointable
    for batch in build_eval_iterator(data_config, tokenizer): ...   # finite, re-iterable

`config.dataset.name` picks the data:
  - embedded (built at first use from text on this machine, nothing downloaded):
    longjax_pystdlib (pretraining, default), longjax_pydocs (summarization),
    longjax_bible_en_es (translation);
  - synthetic long-range diagnostics: passkey, associative_recall, selective_copy,
    and the RULER-style suite (ruler.py);
  - any tfds name (pg19, wmt14_translate/de-en, scientific_papers/arxiv, ...),
    read with `tfds.data_source` from array_record in config.dataset.data_dir, where it
    must be prepared (`tfds build NAME --data_dir=DIR --file_format=array_record`);
    nothing is downloaded at run time unless config.dataset.allow_download.

Modules: `config` (DataConfig, the settings every function here takes),
`tokenizers`, `sources` (names -> data sources), `embedded` (the tfds
builders), `stdlib_corpus` and `sword` (their text), `lm_examples` (windows
and packing), `seq2seq_examples`, `synthetic`, `pipeline` (the tokenizer of a
run and its batches).
"""
from longjax.data.config import DataConfig
from longjax.data.config import DataConfigError
from longjax.data.config import DatasetConfig
from longjax.data.config import SyntheticConfig
from longjax.data.config import TokenizerConfig
from longjax.data.pipeline import build_eval_iterator
from longjax.data.pipeline import build_train_iterator
from longjax.data.pipeline import get_tokenizer
from longjax.data.sources import check_dataset
from longjax.data.sources import DatasetUnavailableError
from longjax.data.sources import EMBEDDED_DATASETS
from longjax.data.config import RULER_TASKS
from longjax.data.config import needle_depth
from longjax.data.sources import SYNTHETIC_TASKS
from longjax.data.tokenizers import ByteTokenizer
from longjax.data.tokenizers import SentencePieceTokenizer
from longjax.data.tokenizers import Tokenizer

__all__ = [
    'DataConfig', 'DataConfigError', 'DatasetConfig', 'SyntheticConfig', 'TokenizerConfig',
    'build_eval_iterator', 'build_train_iterator', 'get_tokenizer', 'Tokenizer',
    'ByteTokenizer', 'SentencePieceTokenizer', 'EMBEDDED_DATASETS', 'SYNTHETIC_TASKS',
    'RULER_TASKS', 'needle_depth',
    'check_dataset', 'DatasetUnavailableError',
]
