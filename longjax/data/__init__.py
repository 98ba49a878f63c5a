"""longjax data: tokenizers, datasets and the batch pipelines the trainer calls.

    tokenizer = get_tokenizer(config, workdir)
    train_iter = build_train_iterator(config, tokenizer)       # infinite, checkpointable
    for batch in build_eval_iterator(config, tokenizer): ...   # finite, re-iterable

`config.dataset.name` picks the data:
  - embedded (built at first use from text on this machine, nothing downloaded):
    longjax_pystdlib (pretraining, default), longjax_pydocs (summarization),
    longjax_bible_en_es (translation);
  - synthetic long-range diagnostics: passkey, associative_recall, selective_copy;
  - any tfds name (pg19, wmt14_translate/de-en, scientific_papers/arxiv, ...),
    read with `tfds.data_source` from array_record in config.dataset.data_dir.

Modules: `tokenizers`, `sources` (names -> data sources), `embedded` (the
tfds builders), `stdlib_corpus` and `sword` (their text), `lm_examples`
(windows and packing), `seq2seq_examples`, `synthetic`, `pipeline`.
"""
from longjax.data.pipeline import build_eval_iterator
from longjax.data.pipeline import build_train_iterator
from longjax.data.pipeline import is_seq2seq
from longjax.data.sources import EMBEDDED_DATASETS
from longjax.data.sources import SYNTHETIC_TASKS
from longjax.data.tokenizers import ByteTokenizer
from longjax.data.tokenizers import get_tokenizer
from longjax.data.tokenizers import SentencePieceTokenizer
from longjax.data.tokenizers import Tokenizer

__all__ = [
    'build_eval_iterator', 'build_train_iterator', 'is_seq2seq', 'get_tokenizer', 'Tokenizer',
    'ByteTokenizer', 'SentencePieceTokenizer', 'EMBEDDED_DATASETS', 'SYNTHETIC_TASKS',
]
