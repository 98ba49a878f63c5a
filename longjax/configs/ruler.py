"""The RULER-style synthetic suite (Hsieh et al. 2024): one config, a task each.

Tasks (formats, generators and answer rules in longjax/data/ruler.py):
niah_single, niah_multikey, niah_multivalue, niah_multiquery (needles in a
haystack), variable_tracking (chains of assignments, `synthetic.hops` hops),
common_words and frequent_words (aggregation); `passkey` and
`associative_recall` (MQAR) have configs of their own. Scored by answer-token
accuracy (teacher forced: the weighted targets) in training and evaluation,
and by exact match of the generated answer with `--mode=decode`. The answer's
tokens are not global tokens for `global_local` (only the question is) unless
`--config.synthetic.global_answers=True`, whose results are "question-marked".

    python -m longjax.main --config=configs/ruler.py:niah_multikey,local --workdir=/tmp/mk
    python -m longjax.main --config=configs/ruler.py:variable_tracking,full \
        --workdir=/tmp/vt --config.seq_len=256 --config.synthetic.hops=2

Argument: a task (default niah_single), an attention kind and/or a size
(`small` default, `tiny`, `long`, as configs/passkey.py).
"""
from longjax.configs import base
from longjax.configs import passkey
from longjax.data.config import RULER_TASKS

# Row length each task gets at sizes `small` and `tiny` (it fits its needles or words).
SMALL_SEQ_LEN = dict(niah_single=128, niah_multikey=128, niah_multivalue=128,
                     niah_multiquery=128, variable_tracking=128, common_words=128,
                     frequent_words=128)


def get_config(arg: str = ''):
  words = [w.strip() for w in (arg or '').split(',') if w.strip()]
  tasks = [w for w in words if w in RULER_TASKS]
  if len(tasks) > 1:
    raise ValueError(f'configs/ruler.py takes one task; got {tasks}.')
  task = tasks[0] if tasks else 'niah_single'
  kind, size = base.parse_arg(','.join(w for w in words if w not in RULER_TASKS),
                              tuple(passkey.SIZES))
  config = passkey.get_config(size)
  config.dataset.name = task
  if size in ('small', 'tiny'):  # (passkey's tiny rows, 32 tokens, hold too few needles)
    config.seq_len = SMALL_SEQ_LEN[task]
  if size == 'small':
    config.num_train_steps = 1000
  if kind:
    config.model.attention.kind = kind
  return config
