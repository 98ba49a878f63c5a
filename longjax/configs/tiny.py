"""Tiny config for tests and smoke runs: a 2-layer LM on the passkey task, seconds on a CPU.

    python -m longjax.main --config=configs/tiny.py --workdir=/tmp/tiny

Everything not set here is `base.py`'s.
"""
from longjax.configs import base


def get_config():
  config = base.get_config()
  config.dataset.name = 'passkey'  # Synthetic: generated on the fly, nothing to build.
  config.synthetic.passkey_digits = 3
  config.seq_len = 32
  config.batch_size = 8
  config.num_train_steps = 20
  config.warmup_steps = 2
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.num_eval_steps = 2
  config.checkpoint_every_steps = 10
  config.keep_checkpoints = 2

  model = config.model
  model.num_layers = 2
  model.emb_dim = 32
  model.num_heads = 4
  model.mlp_dim = 64
  model.max_len = 128
  return config
