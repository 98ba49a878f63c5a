"""longjax.train: the sharded training loop, checkpoints and metrics.

    from longjax.train import train_and_evaluate, evaluate
    state = train_and_evaluate(config, workdir)   # what `python -m longjax.main` runs
    metrics = evaluate(config, workdir)           # --mode=eval

Modules: `trainer` (the loop), `state` (TrainState and its sharded creation),
`optimizer`, `steps` (loss, train and eval steps), `checkpointing` (the only
user of Orbax), `metrics` (metrics.jsonl, TensorBoard, progress line),
`validation` (up-front config checks).
"""
from longjax.train.trainer import evaluate
from longjax.train.trainer import train_and_evaluate

__all__ = ['evaluate', 'train_and_evaluate']
