"""Run workdirs written by hand: a config.json and a metrics.jsonl, as longjax.main writes them."""
import json
import os


def write_run(root, kind, length, seed, records, *, last_step=100, attention=None, model=None,
              dataset='passkey'):
  """A run directory `<root>/<kind>/L<length>_s<seed>` holding exactly `records`."""
  workdir = os.path.join(root, kind, f'L{length}_s{seed}')
  os.makedirs(workdir)
  config = dict(seed=seed, seq_len=length, eval_seq_len=-1, num_train_steps=last_step,
                dataset=dict(name=dataset),
                model=dict(model or {'arch': 'lm'}, attention=dict(attention or {'kind': kind})))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  return workdir


def train_records(speeds, *, every=10, **extra):
  """Train records at steps every, 2 * every, ... with the given tokens/s."""
  return [dict(step=every * (i + 1), split='train', loss=2.0 / (2 + i), tokens_per_sec=speed,
               **extra) for i, speed in enumerate(speeds)]


def simple_run(root, kind, length, seed, final_accuracy, speeds, last_step=100, memory=None):
  """Train records, a mid-run eval and a final eval (both without seq_len, as older runs)."""
  extra = {'peak_memory_bytes': memory} if memory else {}
  records = train_records(speeds, **extra)
  records += [dict(step=last_step // 2, split='eval', accuracy=0.1, perplexity=9.0),
              dict(step=last_step, split='eval', accuracy=final_accuracy, perplexity=3.0)]
  return write_run(root, kind, length, seed, records, last_step=last_step)
