"""Passkey retrieval: find a number hidden in filler, asked for at the end.

The answer-token accuracy vs sequence length separates the attention kinds:
with radius r and L layers, local attention cannot carry the key farther than
about r * L tokens; full, global+local (the question tokens are global) and
hierarchical attention can. Generated on the fly (longjax/data/synthetic.py).

On this 2-core CPU (about a minute at the default length):

    python -m longjax.main --config=configs/passkey.py:local --workdir=/tmp/passkey_local
    python -m longjax.main --config=configs/passkey.py:full --workdir=/tmp/passkey_full \
        --config.seq_len=256

Sweep lengths and kinds (experiments/README.md):

    python -m experiments.sweep --config=configs/passkey.py --lengths=32,64,128 \
        --kinds=full,local,global_local,hierarchical,adaptive_span --workdir=/tmp/passkey_sweep

Real scale (16k tokens, a GPU node or a TPU slice):

    python -m longjax.main --config=configs/passkey.py:global_local,long --workdir=/data/passkey16k

Argument: an attention kind and/or a size: `small` (default), `tiny`, `long`.
"""
from longjax.configs import base

SIZES = {
    'small': {},
    'tiny': dict(base.TINY, seq_len=32),
    'long': {
        'model.attention.kind': 'global_local',
        'seq_len': 16384, 'batch_size': 64, 'num_train_steps': 20_000,
        'learning_rate': 1e-3, 'warmup_steps': 500,
        'model.num_layers': 8, 'model.emb_dim': 512, 'model.num_heads': 8,
        'model.mlp_dim': 2048, 'model.max_len': 65536, 'model.remat': 'full',
        'model.attention.radius': 256, 'model.attention.summary_block': 128,
        'model.attention.level0_block': 128, 'model.attention.chunk_size': 128,
        'model.attention.max_span': 1024, 'model.attention.span_ramp': 64.0,
        'eval_every_steps': 1000, 'checkpoint_every_steps': 1000,
    },
}


def get_config(arg: str = ''):
  kind, size = base.parse_arg(arg, tuple(SIZES))
  config = base.get_config()
  config.dataset.name = 'passkey'
  config.dataset.split_eval = 'eval'
  config.synthetic.passkey_digits = 5
  config.seq_len = 64
  config.batch_size = 32
  config.num_train_steps = 600
  config.warmup_steps = 50
  config.learning_rate = 3e-3
  config.weight_decay = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.num_eval_steps = 8
  config.checkpoint_every_steps = 600
  config.model.num_layers = 2
  config.model.emb_dim = 128
  config.model.dtype = 'float32'
  config.model.max_len = 4096
  config.model.attention.kind = 'full'
  config.model.attention.radius = 8
  # global_local: the question ('?' and the answer so far) is global, as
  # Longformer makes question tokens global; at most num_global of them.
  config.model.attention.global_tokens = 'marked'
  config.model.attention.num_global = 8
  config.model.attention.summary_block = 8  # Whichever of these the kind reads.
  config.model.attention.level0_block = 8
  config.model.attention.chunk_size = 8
  config.model.attention.max_span = 16
  config.model.attention.span_ramp = 8.0
  base.set_size(config, size, SIZES)
  if kind:
    config.model.attention.kind = kind
  return config
