"""Summarization: an encoder-decoder with LongT5-style transient-global attention.

Default data: the embedded `longjax_pydocs` (Python function/class/module
source -> its docstring, docstrings removed from the source).

On this 2-core CPU (minutes):

    python -m longjax.main --config=configs/summarize.py --workdir=/tmp/summarize
    python -m longjax.main --config=configs/summarize.py:local --workdir=/tmp/summarize_local

Real scale, `scientific_papers/arxiv` at 16k input tokens with transient-global
attention (LongT5-base-like) on a Cloud TPU v4-32 slice:

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd longjax && \
      python -m longjax.main --config=configs/summarize.py:transient_global,arxiv \
      --workdir=gs://$BUCKET/arxiv --config.dataset.data_dir=$DATA"

Argument: an encoder attention kind and/or a size: `small` (default), `tiny`, `arxiv`.
"""
from longjax.configs import base

SIZES = {
    'small': {},
    'tiny': dict(base.TINY, seq_len=64, target_len=32),
    'arxiv': {
        'model.attention.kind': 'transient_global',
        'dataset.name': 'scientific_papers/arxiv', 'dataset.input_key': 'article',
        'dataset.target_key': 'abstract', 'dataset.num_workers': 8,
        'tokenizer.kind': 'sentencepiece', 'tokenizer.spm_vocab_size': 32000,
        'seq_len': 16384, 'target_len': 512, 'batch_size': 128, 'num_train_steps': 100_000,
        'learning_rate': 1e-3, 'warmup_steps': 2000,
        'model.num_layers': 12, 'model.emb_dim': 768, 'model.num_heads': 12,
        'model.mlp_dim': 2048, 'model.max_len': 16384, 'model.remat': 'full',
        'model.positions': 't5_bias', 'model.attention.radius': 127,
        'model.attention.summary_block': 16, 'model.attention.level0_block': 16,
        'model.attention.chunk_size': 16,
        'decode.beam_size': 4, 'decode.max_decode_len': 512, 'decode.num_examples': 4,
        'log_every_steps': 50, 'eval_every_steps': 2000, 'num_eval_steps': 20,
        'checkpoint_every_steps': 1000,
        'mesh.data': 1, 'mesh.fsdp': -1,
    },
}


def get_config(arg: str = ''):
  kind, size = base.parse_arg(arg, tuple(SIZES))
  config = base.get_config()
  config.dataset.name = 'longjax_pydocs'
  config.dataset.input_key = 'source'
  config.dataset.target_key = 'docstring'
  config.seq_len = 1024
  config.target_len = 128
  config.batch_size = 8
  config.num_train_steps = 400
  config.warmup_steps = 40
  config.learning_rate = 2e-3
  config.eval_every_steps = 200
  config.num_eval_steps = 4
  config.model.arch = 'encoder_decoder'
  config.model.num_layers = 2
  config.model.positions = 't5_bias'
  config.model.attention.kind = 'transient_global'
  config.model.attention.radius = 64
  config.model.attention.summary_block = 16  # Whichever of these the kind reads.
  config.model.attention.level0_block = 16
  config.model.attention.chunk_size = 16
  config.model.attention.decoder_kind = 'full'
  config.decode.max_decode_len = 128
  base.set_size(config, size, SIZES)
  if kind:
    config.model.attention.kind = kind
  return config
