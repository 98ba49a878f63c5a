"""Base configuration: every field longjax reads, with a one-line comment each.

Task configs (`pretrain.py`, ... beside this file) start from `get_config()` here
and change only what differs. Any field can be overridden on the command line:

    python -m longjax.main --config=configs/pretrain.py --workdir=/tmp/run \
        --config.model.attention.kind=local --config.seq_len=2048

The config is locked by `main.py`, so a misspelled field is an error.
"""
import os

import ml_collections

from longjax.models import config as model_config


def get_model_config() -> ml_collections.ConfigDict:
  """The `model` block: every field, its default and a comment on it are written once,
  in `longjax/models/config.py` (`ModelConfig`, `AttentionConfig`), which reads it back."""
  return ml_collections.ConfigDict(model_config.defaults())


def get_config() -> ml_collections.ConfigDict:
  """Small LM on the embedded stdlib corpus; runs on a 2-core CPU in minutes."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, dropout and data order.

  # Data ------------------------------------------------------------------
  dataset = ml_collections.ConfigDict()
  dataset.name = 'longjax_pystdlib'  # tfds name, an embedded name, or a synthetic task.
  dataset.data_dir = ''  # tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  dataset.split_train = 'train'  # tfds split (slicing like 'train[:90%]' works).
  dataset.split_eval = 'validation'  # Split for evaluation.
  dataset.input_key = 'text'  # Feature holding the document (LM) or the source (seq2seq).
  dataset.target_key = ''  # Feature holding the target (seq2seq); '' for LM.
  dataset.pack = True  # LM: pack short documents together (with segment ids).
  dataset.num_workers = 0  # grain worker processes (0 = in the main process).
  dataset.prefetch = 2  # Batches prefetched on a background thread.
  dataset.verses_per_example = 4  # longjax_bible_en_es: consecutive verses per example.
  dataset.allow_download = False  # tfds dataset not prepared in data_dir: download it, or fail.
  config.dataset = dataset

  tokenizer = ml_collections.ConfigDict()
  tokenizer.kind = 'bytes'  # 'bytes' or 'sentencepiece'.
  tokenizer.spm_model_path = ''  # Existing SentencePiece model; '' trains one into the workdir.
  tokenizer.spm_vocab_size = 8000  # Vocabulary of a SentencePiece model trained here.
  config.tokenizer = tokenizer

  # Synthetic long-range diagnostics (dataset.name = 'passkey', 'associative_recall'
  # or 'selective_copy', or a RULER task); see longjax/data/synthetic.py and ruler.py.
  synthetic = ml_collections.ConfigDict()
  synthetic.num_train_examples = 1_000_000  # Size of the (virtual) training set.
  synthetic.num_eval_examples = 256  # Held-out examples.
  synthetic.passkey_digits = 5  # Digits of the passkey.
  synthetic.passkey_depth = -1.0  # Where the key sits as a fraction of the filler; -1 = uniform.
  synthetic.filler = 'random'  # 'random' tokens or 'text' from the pretraining corpus.
  synthetic.num_pairs = 8  # associative_recall: key-value pairs.
  synthetic.num_queries = 4  # associative_recall: pairs asked for.
  synthetic.copy_tokens = 8  # selective_copy: tokens scattered in noise, then copied.
  # The RULER-style suite (longjax/data/ruler.py; configs/ruler.py).
  synthetic.needle_depth = -1.0  # niah_single/multikey: the asked needle's depth; -1 = uniform.
  synthetic.num_needles = 4  # niah_multikey (1 asked, the rest distractors), niah_multiquery.
  synthetic.num_values = 4  # niah_multivalue: values of the one key.
  synthetic.num_chains = 2  # variable_tracking: chains of assignments (1 asked).
  synthetic.hops = 3  # variable_tracking: assignments per chain.
  synthetic.num_common = 4  # common_words: words repeated word_repeats times among singletons.
  synthetic.word_repeats = 3
  synthetic.num_frequent = 3  # frequent_words: the most frequent words asked for (Zipf words).
  synthetic.global_answers = False  # Mark answer tokens global too ("question-marked").
  config.synthetic = synthetic

  # --mode=context_eval (longjax/train/context_eval.py): loss on fixed targets
  # against the context before them.
  context_eval = ml_collections.ConfigDict()
  context_eval.contexts = ''  # Comma-separated token counts; '' = 8, 16, ... up to seq_len.
  context_eval.num_targets = 20_000  # Target tokens scored at every context.
  context_eval.span = 16  # Consecutive targets per window (target j sees c + j tokens).
  context_eval.min_documents = 50  # Fewer long-enough eval documents is an error.
  context_eval.num_documents = 256  # Documents of the per-position curve.
  context_eval.batch_size = 8  # Windows per forward pass.
  context_eval.bootstrap = 1000  # Resamples of the documents for the 95% intervals.
  config.context_eval = context_eval

  config.seq_len = 512  # Training length (the LM input, or the seq2seq source).
  config.target_len = 128  # Seq2seq target length.
  config.eval_seq_len = -1  # Evaluation length; -1 = seq_len (set higher to test extrapolation).

  # Model: fields and comments in longjax/models/config.py -----------------
  config.model = get_model_config()

  # Optimisation ----------------------------------------------------------
  config.batch_size = 8  # Global batch (all devices and hosts together).
  config.grad_accum_steps = 1  # Micro-batches accumulated per optimizer step.
  config.num_train_steps = 200  # Optimizer steps.
  config.learning_rate = 3e-3  # Peak learning rate.
  config.warmup_steps = 20  # Linear warm-up steps.
  config.lr_schedule = 'cosine'  # 'cosine', 'rsqrt' or 'constant' after warm-up.
  config.min_lr_ratio = 0.1  # Cosine decays to this fraction of the peak.
  config.weight_decay = 0.01  # AdamW decay (not on norms, biases or spans).
  config.adam_b1 = 0.9  # AdamW beta1.
  config.adam_b2 = 0.98  # AdamW beta2.
  config.grad_clip = 1.0  # Global-norm clipping; 0 disables.
  config.z_loss = 0.0  # Weight of log(Z)^2 on the logits (PaLM); 0 disables.
  config.label_smoothing = 0.0  # Label smoothing of the cross-entropy.

  # Loop, evaluation, checkpoints ----------------------------------------
  config.log_every_steps = 10  # Progress line and train metrics.
  config.eval_every_steps = 100  # Evaluation (and seq2seq sample decodes).
  config.num_eval_steps = 8  # Eval batches; -1 = the whole eval split.
  config.checkpoint_every_steps = 100  # Async checkpoint interval.
  config.keep_checkpoints = 3  # Checkpoints kept on disk.
  config.profile_steps = 0  # Steps traced by the profiler after warm-up (0 = off).

  # Decoding (seq2seq evaluation and sampling) ----------------------------
  decode = ml_collections.ConfigDict()
  decode.num_examples = 4  # Eval examples decoded and logged as text during training.
  decode.max_decode_len = 128  # Longest generation.
  decode.beam_size = 1  # 1 = greedy / sampling; >1 = beam search.
  decode.length_penalty = 0.6  # Beam search length penalty alpha.
  decode.temperature = 0.0  # 0 = greedy.
  decode.top_k = 0  # Sample from the k most likely tokens (0 = all).
  decode.top_p = 1.0  # Nucleus sampling mass.
  decode.kv_cache_dtype = 'auto'  # 'int8': the caches' windows quantized (per token and head).
  config.decode = decode

  # Sharding --------------------------------------------------------------
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel axis; -1 = all devices not used by the others.
  mesh.fsdp = 1  # Fully-sharded data parallel (parameters and batch).
  mesh.tensor = 1  # Tensor (model) parallel over heads and MLP.
  mesh.sequence = 1  # Sequence (context) parallel over length.
  config.mesh = mesh
  # Extra (logical name, mesh axes) rules placed before the defaults, e.g.
  # (('mlp', 'tensor'),). See longjax/sharding.py for the default table.
  config.axis_rules = ()
  return config


# Config arguments ----------------------------------------------------------
# Task configs take `--config=configs/<task>.py:<arg>` where <arg> is a comma
# list of an attention kind and/or a size, e.g. `local`, `tiny`,
# `transient_global,arxiv`.


def parse_arg(arg: str, sizes: tuple[str, ...]) -> tuple[str, str]:
  """Splits a config argument into (attention kind or '', size).

  sizes[0] is the default size (or $LONGJAX_CONFIG_SIZE when it names one).
  Unknown words raise, listing what is valid.
  """
  from longjax import attention  # pylint: disable=g-import-not-at-top
  # LONGJAX_CONFIG_SIZE=tiny shrinks any launch to a seconds-long smoke run
  # (how the README's quick-start command is tested).
  default = os.environ.get('LONGJAX_CONFIG_SIZE', '')
  kind, size = '', default if default in sizes else sizes[0]
  for word in filter(None, (w.strip() for w in (arg or '').split(','))):
    if word in attention.KINDS:
      kind = word
    elif word in sizes:
      size = word
    else:
      raise ValueError(f'Unknown config argument {word!r}: use an attention kind '
                       f'({", ".join(attention.KINDS)}) and/or a size ({", ".join(sizes)}).')
  return kind, size


def set_size(config, size: str, sizes: dict) -> None:
  """Applies the field overrides of `size` (dotted names) to config."""
  for dotted, value in sizes[size].items():
    *parents, leaf = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value


# A model and loop small enough to train for a few steps in a test.
TINY = {
    'model.num_layers': 2, 'model.emb_dim': 32, 'model.num_heads': 2, 'model.mlp_dim': 64,
    'model.dtype': 'float32', 'model.attention.radius': 8, 'model.attention.num_global': 2,
    'model.attention.summary_block': 8, 'model.attention.level0_block': 8,
    'model.attention.chunk_size': 8, 'model.attention.max_span': 16,
    'model.attention.span_ramp': 4.0,
    'batch_size': 2, 'num_train_steps': 2, 'warmup_steps': 1, 'log_every_steps': 1,
    'eval_every_steps': 2, 'num_eval_steps': 1, 'checkpoint_every_steps': 2,
    'decode.num_examples': 1, 'decode.max_decode_len': 8,
}
