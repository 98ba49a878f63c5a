"""Training of longjax models: `train_and_evaluate(config, workdir)`.

Launch commands (a laptop, a GPU node, a GPU cluster, a Cloud TPU pod slice)
are in README.md, "Launching". Run again with the same workdir to resume from
the latest checkpoint, data position included; a resume that changes what the
run is (model, tokenizer, data, seed) is refused unless
`allow_config_change` names the fields (`run_identity.resume_check`). The
workdir holds `config.json` (the config of the latest start),
`config_history.jsonl` (every start and what it changed), `metrics.jsonl`,
TensorBoard event files, `checkpoints/` and `trainer.lock` (one trainer per
workdir).
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
from longjax import sharding
from longjax.train import estimate
from longjax.train import metrics
from longjax.train import preemption
from longjax.train import run_identity
from longjax.train import state as state_lib
from longjax.train import steps
from longjax.train.batches import Batches
from longjax.train.evaluation import Evaluator
from longjax.train.evaluation import log_final_line
from longjax.train.evaluation import Samples
from longjax.train.setup import build_run
from longjax.train.workdir_lock import hold as hold_workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change=()) -> state_lib.TrainState:
  """Trains `config.num_train_steps` steps, resuming from `workdir` if it has checkpoints.

  Returns the final TrainState and ends with one line (steps, final train and
  eval loss, tokens/s, wall time, workdir), logged and printed. Raises
  validation.ConfigError (a ValueError) for a bad config (before anything is
  compiled) and FloatingPointError when the loss or gradients stop being
  finite; exits with status 143 (SIGTERM) or 130 (SIGINT) after saving.
  Raises workdir_lock.WorkdirBusyError when another trainer holds the
  workdir, and run_identity.RunIdentityError when a resume changes identity
  fields that `allow_config_change` does not name.
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
  # One trainer per workdir, and SIGTERM / SIGINT mean "finish the step, save,
  # exit" until every save is written: the watcher is entered before the
  # checkpointer, so it is left after the checkpointer waited for its saves.
  with hold_workdir(run.workdir, enabled=is_chief), preemption.StopWatcher() as stop:
    train_iter = data.build_train_iterator(run.config.data, run.tokenizer)
    checkpoints = run.checkpointer()
    # A resume is checked against the saved config before anything is restored,
    # moved or written (config.json is rewritten only after the restore).
    resume = None
    if checkpoints.latest_step() is not None:
      resume = run_identity.resume_check(recorded, run.workdir, allow=allow_config_change)
    writer = metrics.MetricsWriter(run.workdir, enabled=is_chief)
    profiler = metrics.Profiler(loop.profile_steps, os.path.join(run.workdir, 'profile'))
    with checkpoints, writer, profiler:
      state, done = _train(run, recorded, began, checkpoints, writer, profiler, stop,
                           train_iter, resume)
  done()  # After every save has been written.
  return state


def _train(run, recorded, began, checkpoints, writer, profiler, stop, train_iter, resume):
  """The loop of train_and_evaluate, inside its lock, watcher and checkpointer.

  Returns the final state and the final line's printer (called once the saves are written).
  """
  loop = run.config.loop
  check_finite = functools.partial(_check_finite, checkpoints=checkpoints,
                                   grad_clip=run.config.optimizer.grad_clip)
  writer.write_hparams(recorded.to_dict())
  # The latest checkpoint (with the data position, unless the data changed), or
  # a fresh state.
  restored = checkpoints.restore(
      run.abstract_state, None if resume and resume.restart_data else train_iter)
  if restored:
    start_step, state = restored
    writer.truncate_after(start_step)
  else:
    start_step, state = 0, run.fresh_state()
    writer.start_fresh()  # An earlier run's records are moved aside, not continued.
  if jax.process_index() == 0:
    run_identity.record_start(recorded, run.workdir, step=start_step, resume=resume)
  logging.info('%s parameters; starting at step %d of %d.',
               f'{state_lib.num_params(run.abstract_state.params):,}', start_step,
               loop.num_train_steps)

  # The train step, compiled once before the first step, and the evaluator.
  seq_len = run.config.data.seq_len
  train_step, batches = compile_train_step(run)
  compiled_memory = metrics.log_memory(train_step)
  estimate.warn_if_too_large(estimate.plan(train_step, run))
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
    # A save that failed in the background stops the run here, not at the next save.
    checkpoints.check()
    since_log.append(step_metrics)
    # The finiteness of step n-1 is read once step n is queued: the device
    # has (nearly always) finished n-1 by then, so this one-bool transfer
    # does not stall it; the host just never runs more than a step ahead.
    check_finite(unchecked)
    unchecked = (step, step_metrics['finite'])

    last = step == loop.num_train_steps
    preempted = stop.reached(step)
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
      logging.warning('%s: saving step %d in %s, then exiting.', stop.signal_name, step,
                      checkpoints.directory)
      _final_line(f'train stopped by {stop.signal_name} (run again to resume)', run, began,
                  loop_began, start_step, step, batches.tokens_per_step(seq_len), last_train,
                  last_eval)
      raise SystemExit(stop.exit_status)  # After the save completes (__exit__).
  return state, functools.partial(
      _final_line, 'train done', run, began, loop_began, start_step, loop.num_train_steps,
      batches.tokens_per_step(seq_len), last_train, last_eval)


def compile_train_step(run):
  """(the train step compiled for the run's state and batch shapes, its Batches):
  ahead of time, from abstract values (nothing is allocated)."""
  seq_len = run.config.data.seq_len
  batches = Batches(run.config.data, run.mesh, run.rules)
  train_step = jax.jit(
      steps.make_train_step(run.graphdef, run.tx, run.schedule, run.step_settings(),
                            run.shardings.params),
      in_shardings=(run.shardings, batches.shardings(seq_len)),
      out_shardings=(run.shardings, run.replicated),
      donate_argnums=0)
  with sharding.axis_rules(run.mesh, run.rules):
    return train_step.lower(run.abstract_state, batches.abstract(seq_len)).compile(), batches


def estimate_memory(config: ml_collections.ConfigDict, workdir: str) -> estimate.MemoryPlan:
  """--mode=estimate: validates, compiles the train step ahead of time and prints
  its memory per device and whether it fits (`longjax/train/estimate.py`)."""
  run = build_run(config, workdir)
  compiled, batches = compile_train_step(run)
  memory_plan = estimate.plan(compiled, run)
  if memory_plan is None:
    raise ValueError(f'{jax.devices()[0].platform}: XLA gives no memory analysis of compiled '
                     f'programs here, so --mode=estimate has nothing to report.')
  print(estimate.report(memory_plan, run, batches.tokens_per_step(run.config.data.seq_len)),
        flush=True)
  return memory_plan


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
