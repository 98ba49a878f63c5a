"""Multi-query associative recall (MQAR): key-value pairs, queried later.

Harder than passkey: the model must bind many pairs and look several up. Rises
above chance within minutes on a CPU but needs far longer to solve.

    python -m longjax.main --config=configs/associative_recall.py:full --workdir=/tmp/mqar

Real scale: `--config=configs/associative_recall.py:global_local,long`.
Argument: an attention kind and/or a size: `small` (default), `tiny`, `long`.
"""
from longjax.configs import base
from longjax.configs import passkey


def get_config(arg: str = ''):
  kind, size = base.parse_arg(arg, tuple(passkey.SIZES))
  config = passkey.get_config(size)
  config.dataset.name = 'associative_recall'
  config.synthetic.num_pairs = 8
  config.synthetic.num_queries = 4
  if size == 'small':
    config.seq_len = 96
    config.num_train_steps = 1500
  if kind:
    config.model.attention.kind = kind
  return config
