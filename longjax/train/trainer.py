"""Training of longjax models: `train_and_evaluate(config, workdir)`.

Launch commands (a laptop, a GPU node, a GPU cluster, a Cloud TPU pod slice)
are in README.md, "Launching". Run again with the same workdir to resume from
the latest checkpoint, data position included. The workdir holds
`config.json`, `metrics.jsonl`, TensorBoard event files and `checkpoints/`.
"""
from __future__ import annotations

import copy
import functools
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections

from longjax import data
from longjax import files
from longjax import sharding
from longjax.train import checkpointing
from longjax.train import metrics
from longjax.train import state as state_lib
from longjax.train import steps
from longjax.train.batches import Batches
from longjax.train.evaluation import Evaluator
from longjax.train.evaluation import log_final_line
from longjax.train.evaluation import Samples
from longjax.train.setup import build_run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains `config.num_train_steps` steps, resuming from `workdir` if it has checkpoints.

  Returns the final TrainState and ends with one line (steps, final train and
  eval loss, tokens/s, wall time, workdir), logged and printed. Raises
  validation.ConfigError (a ValueError) for a bad config (before anything is
  compiled) and FloatingPointError when the loss or gradients stop being
  finite; exits with status 143 after saving on SIGTERM.
  """
  began = time.perf_counter()
  # Mesh, validated settings, tokenizer, model, optimizer and state layout:
  # a bad config fails here, in a second.
  run = build_run(config, workdir)
  loop, mesh = run.config.loop, run.mesh
  is_chief = jax.process_index() == 0
  logging.info('Mesh %s over %d devices in %d processes.', dict(mesh.shape),
               jax.device_count(), jax.process_count())
  recorded = _recorded_config(config, run.config.model.vocab_size)
  if is_chief:
    os.makedirs(run.workdir, exist_ok=True)
    files.write_atomically(os.path.join(run.workdir, 'config.json'),
                           recorded.to_json_best_effort(indent=2, sort_keys=True))

  # Data, checkpoints, metrics. Inside the `with`, SIGTERM means "finish the
  # step, save, exit", and everything is closed (saves completed) on the way out.
  train_iter = data.build_train_iterator(run.config.data, run.tokenizer)
  checkpoints = run.checkpointer()
  writer = metrics.MetricsWriter(run.workdir, enabled=is_chief)
  profiler = metrics.Profiler(loop.profile_steps, os.path.join(run.workdir, 'profile'))
  check_finite = functools.partial(_check_finite, checkpoints=checkpoints,
                                   grad_clip=run.config.optimizer.grad_clip)
  with checkpoints, writer, profiler, checkpointing.PreemptionWatcher() as preemption:
    writer.write_hparams(recorded.to_dict())
    # The latest checkpoint (with the data position), or a fresh state.
    restored = checkpoints.restore(run.abstract_state, train_iter)
    if restored:
      start_step, state = restored
      writer.truncate_after(start_step)
    else:
      start_step, state = 0, run.fresh_state()
      writer.start_fresh()  # An earlier run's records are moved aside, not continued.
    logging.info('%s parameters; starting at step %d of %d.',
                 f'{state_lib.num_params(run.abstract_state.params):,}', start_step,
                 loop.num_train_steps)

    # The train step, compiled once before the first step, and the evaluator.
    seq_len = run.config.data.seq_len
    batches = Batches(run.config.data, mesh, run.rules)
    train_step = jax.jit(
        steps.make_train_step(run.graphdef, run.tx, run.schedule, run.step_settings(),
                              run.shardings.params),
        in_shardings=(run.shardings, batches.shardings(seq_len)),
        out_shardings=(run.shardings, run.replicated),
        donate_argnums=0)
    with sharding.axis_rules(mesh, run.rules):
      train_step = train_step.lower(run.abstract_state, batches.abstract(seq_len)).compile()
    compiled_memory = metrics.log_memory(train_step)
    evaluator = Evaluator(run)
    samples = Samples(run)

    # The loop: step, check, log, evaluate, checkpoint.
    progress = metrics.Progress(total_steps=loop.num_train_steps,
                                tokens_per_step=batches.tokens_per_step(seq_len),
                                start_step=start_step)
    with_bits_per_byte = not run.config.data.synthetic
    since_log = []  # Device metrics of the steps since the last log line.
    last_train, last_eval = None, None  # For the final line.
    loop_began = time.perf_counter()
    unchecked = None  # (step, finite flag) not yet looked at by the host.
    for step in range(start_step + 1, loop.num_train_steps + 1):
      profiler.before(step, start_step, state)
      state, step_metrics = train_step(state, batches.global_batch(next(train_iter)))
      since_log.append(step_metrics)
      # The finiteness of step n-1 is read once step n is queued: the device
      # has (nearly always) finished n-1 by then, so this one-bool transfer
      # does not stall it; the host just never runs more than a step ahead.
      check_finite(unchecked)
      unchecked = (step, step_metrics['finite'])

      last = step == loop.num_train_steps
      preempted = preemption.reached(step)
      if step % loop.log_every_steps == 0 or last or preempted:
        fetched = jax.device_get(since_log)
        since_log = []
        check_finite(unchecked)
        unchecked = None
        summary = metrics.train_summary(fetched, with_bits_per_byte=with_bits_per_byte)
        summary.update(progress.rates(step))
        summary.update(metrics.memory_use(compiled_memory))
        writer.write(step, 'train', summary)
        logging.info(progress.line(step, summary['loss'], summary))
        last_train = summary['loss']
      if _every(step, loop.eval_every_steps) or (last and loop.eval_every_steps > 0):
        check_finite(unchecked)
        unchecked = None
        summary = evaluator(state.params)
        last_eval = summary
        writer.write(step, 'eval', summary)
        logging.info('eval at step %d: %s', step, metrics.format_summary(summary))
        if samples.enabled:
          text = samples(state.params)
          writer.write_texts(step, {'decode/samples': text})
          logging.info('decoded eval samples at step %d:\n%s', step, text)
      if _every(step, loop.checkpoint_every_steps) or last or preempted:
        # Only a state whose step was checked finite is ever saved.
        check_finite(unchecked)
        unchecked = None
        checkpoints.save(step, state, train_iter)
      if preempted:
        logging.warning('Preemption notice: saving step %d in %s, then exiting.', step,
                        checkpoints.directory)
        _final_line('train stopped by SIGTERM (run again to resume)', run, began, loop_began,
                    start_step, step, batches.tokens_per_step(seq_len), last_train, last_eval)
        raise SystemExit(checkpointing.EXIT_PREEMPTED)  # After the save completes (__exit__).
  _final_line('train done', run, began, loop_began, start_step, loop.num_train_steps,
              batches.tokens_per_step(seq_len), last_train, last_eval)
  return state


def _final_line(headline, run, began, loop_began, start_step, step, tokens_per_step, train_loss,
                eval_summary):
  """The run's closing line; tokens/s is the loop's average, evaluations included."""
  trained = step - start_step
  seconds = time.perf_counter() - loop_began
  log_final_line(headline, run.workdir, began=began,
                 steps=f'steps {start_step}->{step} of {run.config.loop.num_train_steps}',
                 train_loss=train_loss, eval_summary=eval_summary,
                 tokens_per_sec=trained * tokens_per_step / seconds if trained else None)


def _recorded_config(config: ml_collections.ConfigDict, vocab_size: int):
  """The config as config.json and the hparams record it: with the tokenizer's vocabulary.

  The model is built with the tokenizer's vocabulary whatever
  config.model.vocab_size says; the record says what was built.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.vocab_size = int(vocab_size)
  return config


def _check_finite(unchecked: Optional[tuple[int, Any]], *, checkpoints, grad_clip: float):
  """Raises FloatingPointError if that step's loss, gradients or parameters are not finite.

  The message says what is true: which checkpoint there is to go back to (if
  any), and clipping only as advice when it is off.
  """
  if unchecked is None:
    return
  step, finite = unchecked
  if not bool(finite):
    checkpoints.wait()
    latest = checkpoints.latest_step()
    if latest is None:
      saved = f'No checkpoint was saved before it, in {checkpoints.directory}.'
    else:
      saved = (f'The last good checkpoint is step {latest} in {checkpoints.directory} '
               f'(nothing later was saved).')
    advice = 'Lower config.learning_rate or raise config.warmup_steps'
    advice += (f' (config.grad_clip = {grad_clip:g} already clips the gradients).' if grad_clip
               else ', or set config.grad_clip (e.g. 1.0).')
    raise FloatingPointError(
        f'Training stopped at step {step}: the loss, the gradients or the updated '
        f'parameters contain NaN or Inf. {saved} {advice}')


def _every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0
