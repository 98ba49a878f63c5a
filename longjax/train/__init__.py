"""longjax.train: the sharded training loop, its set-up, evaluation, checkpoints and metrics.

    from longjax.train import train_and_evaluate, evaluate, decode_eval
    state = train_and_evaluate(config, workdir)   # what `python -m longjax.main` runs
    metrics = evaluate(config, workdir)           # --mode=eval
    scores = decode_eval(config, workdir)         # --mode=decode

Modules: `trainer` (the loop), `setup` (`build_run`: the one set-up of every
entry point), `validation` (the up-front checks, into a typed `RunConfig`,
`run_config`), `evaluation` (eval during training, --mode=eval and
--mode=decode), `batches` (global batches from process rows), `state`
(TrainState and its sharded creation), `optimizer`, `steps` (loss, train and
eval steps), `checkpointing` (the only user of Orbax), `metrics`
(metrics.jsonl, TensorBoard, progress line, memory, profiles).
"""
from longjax.train.evaluation import decode_eval
from longjax.train.evaluation import evaluate
from longjax.train.setup import build_run
from longjax.train.setup import Run
from longjax.train.trainer import train_and_evaluate

__all__ = ['Run', 'build_run', 'decode_eval', 'evaluate', 'train_and_evaluate']
