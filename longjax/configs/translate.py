"""Translation: an encoder-decoder on the embedded English -> Spanish Bible.

The source (World English Bible) and target (Reina-Valera 1909) are
verse-aligned; `dataset.verses_per_example` consecutive verses make one long
example, so the input length is a knob (1 verse ~ 130 bytes, 16 ~ 2k).

On this 2-core CPU (minutes; needs `apt-get install sword-text-web sword-text-sparv`):

    python -m longjax.main --config=configs/translate.py --workdir=/tmp/translate
    python -m longjax.main --config=configs/translate.py --workdir=/tmp/translate --mode=decode

Real scale, `wmt14_translate/de-en` on a multi-GPU node (8 GPUs, data parallel):

    python -m longjax.main --config=configs/translate.py:wmt14 --workdir=/data/runs/wmt14

Argument: an encoder attention kind and/or a size: `small` (default), `tiny`, `wmt14`.
"""
from longjax.configs import base

SIZES = {
    'small': {},
    'tiny': dict(base.TINY, seq_len=64, target_len=64),
    'wmt14': {
        'model.attention.kind': 'full',
        'dataset.name': 'wmt14_translate/de-en', 'dataset.input_key': 'de',
        'dataset.target_key': 'en', 'dataset.num_workers': 8,
        'tokenizer.kind': 'sentencepiece', 'tokenizer.spm_vocab_size': 32000,
        'seq_len': 256, 'target_len': 256, 'batch_size': 256, 'num_train_steps': 100_000,
        'learning_rate': 1e-3, 'warmup_steps': 4000,
        'model.num_layers': 6, 'model.emb_dim': 512, 'model.num_heads': 8,
        'model.mlp_dim': 2048, 'model.dropout_rate': 0.1, 'model.max_len': 1024,
        'decode.beam_size': 4, 'decode.max_decode_len': 256, 'decode.num_examples': 8,
        'log_every_steps': 100, 'eval_every_steps': 2000, 'num_eval_steps': 20,
        'checkpoint_every_steps': 2000,
        'mesh.data': -1,
    },
}


def get_config(arg: str = ''):
  kind, size = base.parse_arg(arg, tuple(SIZES))
  config = base.get_config()
  config.dataset.name = 'longjax_bible_en_es'
  config.dataset.input_key = 'en'
  config.dataset.target_key = 'es'
  config.dataset.split_eval = 'validation'
  config.dataset.verses_per_example = 2
  config.seq_len = 384
  config.target_len = 384
  config.batch_size = 8
  config.num_train_steps = 400
  config.warmup_steps = 40
  config.learning_rate = 2e-3
  config.eval_every_steps = 200
  config.num_eval_steps = 4
  config.model.arch = 'encoder_decoder'
  config.model.num_layers = 2
  config.model.attention.kind = 'local'
  config.model.attention.radius = 64
  config.model.attention.decoder_kind = 'full'
  config.decode.max_decode_len = 384
  base.set_size(config, size, SIZES)
  if kind:
    config.model.attention.kind = kind
  return config
