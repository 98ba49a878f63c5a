"""Pretraining: a byte-level causal LM on the embedded Python stdlib corpus.

On a laptop / this 2-core CPU (a few minutes):

    python -m longjax.main --config=configs/pretrain.py --workdir=/tmp/pretrain
    python -m longjax.main --config=configs/pretrain.py:local --workdir=/tmp/pretrain_local

Real scale, `pg19` at 16k tokens with global+local attention on a Cloud TPU
v4-32 slice (prepare pg19 as array_record first:
`tfds build pg19 --file_format=array_record --data_dir=$DATA`):

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd longjax && \
      python -m longjax.main --config=configs/pretrain.py:global_local,pg19 \
      --workdir=gs://$BUCKET/pretrain_pg19 --config.dataset.data_dir=$DATA"

Argument: an attention kind and/or a size: `small` (default), `tiny` (tests), `pg19`.
"""
from longjax import attention
from longjax.configs import base

SIZES = {
    'small': {},
    'tiny': dict(base.TINY, seq_len=64),
    'pg19': {
        'model.attention.kind': 'global_local',
        'dataset.name': 'pg19', 'dataset.input_key': 'book_text',
        'dataset.split_eval': 'validation', 'dataset.num_workers': 8,
        'tokenizer.kind': 'sentencepiece', 'tokenizer.spm_vocab_size': 32000,
        'seq_len': 16384, 'batch_size': 64, 'num_train_steps': 100_000,
        'learning_rate': 3e-4, 'warmup_steps': 2000, 'weight_decay': 0.1,
        'model.num_layers': 24, 'model.emb_dim': 1024, 'model.num_heads': 16,
        'model.num_kv_heads': 8, 'model.mlp_dim': 2816, 'model.max_len': 65536,
        'model.remat': 'full', 'model.attention.radius': 512,
        'model.attention.num_global': 16, 'model.attention.summary_block': 128,
        'model.attention.level0_block': 128, 'model.attention.chunk_size': 128,
        'model.attention.max_span': 2048,
        'log_every_steps': 50, 'eval_every_steps': 2000, 'num_eval_steps': 50,
        'checkpoint_every_steps': 1000,
        'mesh.data': 1, 'mesh.fsdp': -1,
    },
}


def get_config(arg: str = ''):
  kind, size = base.parse_arg(arg, tuple(SIZES))
  config = base.get_config()
  config.dataset.name = 'longjax_pystdlib'
  config.dataset.input_key = 'text'
  config.seq_len = 512
  config.batch_size = 8
  config.num_train_steps = 300
  config.warmup_steps = 30
  config.learning_rate = 2e-3
  config.eval_every_steps = 100
  config.num_eval_steps = 16
  config.model.num_layers = 4
  config.model.attention.kind = 'full'
  config.model.attention.radius = 64
  config.model.attention.summary_block = 64  # Whichever of these the kind reads.
  config.model.attention.level0_block = 64
  config.model.attention.chunk_size = 64
  config.model.attention.max_span = 128
  base.set_size(config, size, SIZES)
  if kind:
    config.model.attention.kind = kind
    if not attention.spec(kind).segment_aligned:
      # Its groups follow the row (multiresolution): packed, a document's result would
      # move with its offset, so each document gets a row of its own.
      config.dataset.pack = False
  return config
