r"""Training and evaluation of longjax models: `train_and_evaluate(config, workdir)`.

Launch (from the repository root; any config field is `--config.x.y=value`):

  Laptop or one GPU:
    python -m longjax.main --config=configs/base.py --workdir=/tmp/run

  Several GPUs in one machine: one process sees them all; the mesh takes them
  (config.mesh.data = -1 means "every device not used by the other axes"):
    python -m longjax.main --config=configs/base.py --workdir=/tmp/run \
        --config.mesh.fsdp=4 --config.batch_size=64

  GPU cluster: one process per host, told where the coordinator is:
    python -m longjax.main --config=... --workdir=/shared/run \
        --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK

  Cloud TPU pod slice: the same command on every worker (jax.distributed
  discovers the others); the workdir must be a file system all hosts share
  (NFS, Filestore, a gcsfuse mount):
    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
        cd longjax && python -m longjax.main --config=configs/base.py \
        --workdir=/mnt/shared/run --config.mesh.fsdp=-1 --config.mesh.data=1 \
        --config.batch_size=256"

  Evaluate the latest checkpoint (at another length, on another mesh):
    python -m longjax.main --config=configs/base.py --workdir=/tmp/run --mode=eval \
        --config.eval_seq_len=2048

Run again with the same workdir to resume from the latest checkpoint, data
position included. The workdir holds `config.json`, `metrics.jsonl`,
TensorBoard event files and `checkpoints/`.
"""
from __future__ import annotations

import copy
import json
import os
import resource
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from longjax import data
from longjax import decode as decode_lib
from longjax import models
from longjax import sharding
from longjax.data import lm_examples
from longjax.data import seq2seq_examples
from longjax.data import sources
from longjax.train import checkpointing
from longjax.train import metrics
from longjax.train import optimizer
from longjax.train import state as state_lib
from longjax.train import steps
from longjax.train import validation


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains `config.num_train_steps` steps, resuming from `workdir` if it has checkpoints.

  Returns the final TrainState. Raises ValueError for a bad config (before
  anything is compiled) and FloatingPointError when the loss or gradients
  stop being finite; exits with status 143 after saving on SIGTERM.
  """
  workdir = _absolute(workdir)
  is_chief = jax.process_index() == 0

  # Mesh and up-front checks: a bad config fails here, in a second.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.axis_rules)
  validation.validate_config(config, mesh_shape=dict(mesh.shape),
                             process_count=jax.process_count())
  logging.info('Mesh %s over %d devices in %d processes.', dict(mesh.shape),
               jax.device_count(), jax.process_count())

  # Tokenizer, then the model config with its vocabulary.
  tokenizer = data.get_tokenizer(config, workdir)
  config = _with_vocab_size(config, tokenizer.vocab_size)
  model_config = models.ModelConfig.from_config(config.model)
  seq2seq = data.is_seq2seq(config)
  synthetic = sources.is_synthetic(config.dataset.name)
  if is_chief:
    _write_config(config, workdir)

  # Optimizer and the layout of every array of the training state.
  graphdef, abstract_params = state_lib.abstract_model(model_config)
  schedule = optimizer.learning_rate_schedule(config)
  tx = optimizer.make_optimizer(config, schedule, optimizer.weight_decay_mask(abstract_params))
  shardings = state_lib.state_shardings(tx, abstract_params, mesh, rules)
  abstract_state = state_lib.abstract_train_state(model_config, tx, shardings)

  # Data, checkpoints, metrics. Inside the `with`, SIGTERM means "finish the
  # step, save, exit", and everything is closed (saves completed) on the way out.
  train_iter = data.build_train_iterator(config, tokenizer)
  checkpoints = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                           keep=config.keep_checkpoints)
  writer = metrics.MetricsWriter(workdir, enabled=is_chief)
  profiler = _Profiler(config.profile_steps, os.path.join(workdir, 'profile'))
  with checkpoints, writer, profiler, checkpointing.PreemptionWatcher() as preemption:
    writer.write_hparams(config.to_dict())
    # The latest checkpoint (with the data position), or a fresh state.
    restored = checkpoints.restore(abstract_state, train_iter)
    if restored:
      start_step, state = restored
      writer.truncate_after(start_step)
    else:
      start_step = 0
      state = state_lib.create_train_state(model_config, tx, shardings, seed=config.seed)
    logging.info('%s parameters; starting at step %d of %d.',
                 f'{state_lib.num_params(abstract_state.params):,}', start_step,
                 config.num_train_steps)

    # The train step, compiled once before the first step, and the evaluator.
    batches = _Batches(config, mesh, rules, seq2seq=seq2seq)
    train_settings = steps.StepSettings.from_config(
        config, seq2seq=seq2seq,
        token_byte_lengths=None if synthetic else tokenizer.token_byte_lengths)
    train_step = jax.jit(
        steps.make_train_step(graphdef, tx, schedule, train_settings, shardings.params),
        in_shardings=(shardings, batches.shardings(config.seq_len)),
        out_shardings=(shardings, _replicated(mesh)),
        donate_argnums=0)
    with sharding.axis_rules(mesh, rules):
      train_step = train_step.lower(abstract_state, batches.abstract(config.seq_len)).compile()
    compiled_memory = _log_memory(train_step)
    evaluator = _Evaluator(config, tokenizer, graphdef, mesh, rules, shardings.params,
                           seq2seq=seq2seq, synthetic=synthetic)
    samples = _Samples(config, tokenizer, graphdef, mesh, rules, seq2seq=seq2seq)

    # The loop: step, check, log, evaluate, checkpoint.
    progress = metrics.Progress(total_steps=config.num_train_steps,
                                tokens_per_step=batches.tokens_per_step(config.seq_len),
                                start_step=start_step)
    since_log = []  # Device metrics of the steps since the last log line.
    unchecked = None  # (step, finite flag) not yet looked at by the host.
    for step in range(start_step + 1, config.num_train_steps + 1):
      profiler.before(step, start_step, state)
      state, step_metrics = train_step(state, batches.global_batch(next(train_iter)))
      since_log.append(step_metrics)
      # The finiteness of step n-1 is read once step n is queued: the device
      # has (nearly always) finished n-1 by then, so this one-bool transfer
      # does not stall it; the host just never runs more than a step ahead.
      _check_finite(unchecked, checkpoints)
      unchecked = (step, step_metrics['finite'])

      last = step == config.num_train_steps
      preempted = preemption.reached(step)
      if step % config.log_every_steps == 0 or last or preempted:
        fetched = jax.device_get(since_log)
        since_log = []
        _check_finite(unchecked, checkpoints)
        unchecked = None
        summary = metrics.train_summary(fetched, with_bits_per_byte=not synthetic)
        summary.update(progress.rates(step))
        summary.update(_memory_use(compiled_memory))
        writer.write(step, 'train', summary)
        logging.info(progress.line(step, summary['loss'], summary))
      if _every(step, config.eval_every_steps) or (last and config.eval_every_steps > 0):
        _check_finite(unchecked, checkpoints)
        unchecked = None
        summary = evaluator(state.params)
        writer.write(step, 'eval', summary)
        logging.info('eval at step %d: %s', step, _format(summary))
        if samples.enabled:
          text = samples(state.params)
          writer.write_texts(step, {'decode/samples': text})
          logging.info('decoded eval samples at step %d:\n%s', step, text)
      if _every(step, config.checkpoint_every_steps) or last or preempted:
        # Only a state whose step was checked finite is ever saved.
        _check_finite(unchecked, checkpoints)
        unchecked = None
        checkpoints.save(step, state, train_iter)
      if preempted:
        logging.warning('Preemption notice: saving step %d in %s, then exiting.', step,
                        checkpoints.directory)
        raise SystemExit(checkpointing.EXIT_PREEMPTED)  # After the save completes (__exit__).
  return state


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir` on the eval split.

  Uses `config.eval_seq_len` (which may exceed the training length) on the
  mesh of *this* run, whatever mesh trained it. The metrics are logged to
  `metrics.jsonl` with split "eval" at the checkpoint's step, and returned.
  """
  run = _restore_latest(config, workdir)
  evaluator = _Evaluator(run.config, run.tokenizer, run.graphdef, run.mesh, run.rules,
                         run.param_shardings, seq2seq=data.is_seq2seq(run.config),
                         synthetic=sources.is_synthetic(run.config.dataset.name))
  summary = evaluator(run.state.params)
  with metrics.MetricsWriter(run.workdir, enabled=jax.process_index() == 0) as writer:
    writer.write(run.step, 'eval', summary)
  logging.info('eval of step %d: %s', run.step, _format(summary))
  return summary


def decode_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Generates for the eval split from the latest checkpoint and scores it.

  Seq2seq: greedy or beam search as `config.decode` says, ROUGE-1/2/L and
  BLEU against the references. LM tasks (passkey, ...): the answer after each
  prompt, exact match. Predictions go to `workdir/decode/predictions_step{N}.jsonl`,
  the scores to `metrics.jsonl` (split "decode") and TensorBoard.
  """
  if jax.process_count() > 1:
    raise NotImplementedError('--mode=decode runs on one process; copy the checkpoint and '
                              'decode on a single host.')
  run = _restore_latest(config, workdir)
  summary = decode_lib.decode_and_score(run.config, run.workdir, (run.graphdef, run.state.params),
                                        run.tokenizer, step=run.step, mesh=run.mesh,
                                        rules=run.rules)
  with metrics.MetricsWriter(run.workdir, enabled=True) as writer:
    writer.write(run.step, 'decode', summary)
  logging.info('decode of step %d: %s', run.step, _format(summary))
  return summary


class _Restored(NamedTuple):
  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  graphdef: Any
  mesh: Any
  rules: tuple
  param_shardings: Any
  step: int
  state: state_lib.TrainState


def _restore_latest(config, workdir) -> _Restored:
  """The latest checkpoint of `workdir` on this run's mesh, for evaluation."""
  workdir = _absolute(workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.axis_rules)
  validation.validate_config(config, mesh_shape=dict(mesh.shape),
                             process_count=jax.process_count())
  tokenizer = data.get_tokenizer(config, workdir)
  config = _with_vocab_size(config, tokenizer.vocab_size)
  model_config = models.ModelConfig.from_config(config.model)

  graphdef, abstract_params = state_lib.abstract_model(model_config)
  tx = optimizer.make_optimizer(config, optimizer.learning_rate_schedule(config),
                                optimizer.weight_decay_mask(abstract_params))
  shardings = state_lib.state_shardings(tx, abstract_params, mesh, rules)
  # Read-only: a training run may be writing to this directory right now.
  with checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  keep=config.keep_checkpoints, read_only=True) as checkpoints:
    restored = checkpoints.restore(state_lib.abstract_train_state(model_config, tx, shardings))
  if restored is None:
    raise FileNotFoundError(f'No checkpoint to evaluate in {workdir}/checkpoints; train first '
                            f'with the same --workdir.')
  step, state = restored
  return _Restored(config, workdir, tokenizer, graphdef, mesh, rules, shardings.params, step,
                   state)


# Helpers, in the order train_and_evaluate uses them -----------------------


def _absolute(workdir) -> str:
  """Orbax needs absolute paths; URLs (gs://...) are left alone."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(workdir)


def _with_vocab_size(config, vocab_size: int):
  """A copy of the config whose model.vocab_size is the tokenizer's."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.vocab_size = int(vocab_size)
  return config


def _write_config(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + '.tmp', path)


def _replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


class _Batches:
  """Shapes, shardings and assembly of global batches from per-process rows.

  Every feature is [batch, length]: the batch over data x fsdp, the length
  over the sequence axis, as the `batch` and `length` rules say.
  """

  def __init__(self, config, mesh, rules, *, seq2seq: bool):
    self.global_batch_size = int(config.batch_size)
    self.target_len = int(config.target_len)
    self.seq2seq = seq2seq
    self.mesh = mesh
    self.rules = rules
    self._shardings = {}  # seq_len -> {feature: NamedSharding}

  def shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, int], Any]]:
    b = self.global_batch_size
    if self.seq2seq:
      lengths = {'inputs': seq_len, 'inputs_segment_ids': seq_len}
      return {key: ((b, lengths.get(key, self.target_len)),
                    np.float32 if key == 'weights' else np.int32)
              for key in seq2seq_examples.SEQ2SEQ_FEATURES}
    return {key: ((b, seq_len), np.float32 if key == 'weights' else np.int32)
            for key in lm_examples.LM_FEATURES}

  def shardings(self, seq_len: int) -> dict[str, NamedSharding]:
    if seq_len not in self._shardings:
      self._shardings[seq_len] = {
          key: NamedSharding(self.mesh, sharding.logical_to_spec(
              ('batch', 'length'), shape, self.mesh, self.rules))
          for key, (shape, _) in self.shapes(seq_len).items()}
    return self._shardings[seq_len]

  def abstract(self, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    layout = self.shardings(seq_len)
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=layout[key])
            for key, (shape, dtype) in self.shapes(seq_len).items()}

  def tokens_per_step(self, seq_len: int) -> int:
    return self.global_batch_size * (seq_len + (self.target_len if self.seq2seq else 0))

  def global_batch(self, local_batch) -> dict[str, jax.Array]:
    """One global jax.Array per feature from this process's rows."""
    seq_len = local_batch['inputs'].shape[1]
    layout = self.shardings(seq_len)
    return {key: jax.make_array_from_process_local_data(
        layout[key], np.asarray(local_batch[key]),
        (self.global_batch_size,) + np.shape(local_batch[key])[1:])
            for key in layout}


class _Samples:
  """A few eval examples decoded at every evaluation of a seq2seq run.

  The batch is read once (the first rows of the eval split), so the samples
  of successive evaluations can be compared. Single-process runs only.
  """

  def __init__(self, config, tokenizer, graphdef, mesh, rules, *, seq2seq: bool):
    self.enabled = (seq2seq and config.decode.num_examples > 0 and
                    config.eval_every_steps > 0 and jax.process_count() == 1)
    self._args = (config, tokenizer, graphdef, mesh, rules)
    self._batch = None
    if self.enabled:
      self._batch = next(iter(data.build_eval_iterator(
          config, tokenizer, with_text=True, process_index=0, process_count=1)))

  def __call__(self, params) -> str:
    config, tokenizer, graphdef, mesh, rules = self._args
    samples = decode_lib.sample_texts(config, (graphdef, params), tokenizer, self._batch,
                                      mesh=mesh, rules=rules)
    return decode_lib.format_samples(samples)


def _log_memory(compiled) -> Optional[int]:
  """Logs XLA's memory plan of the compiled step; returns its bytes per device."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  mib = lambda n: n / 2**20
  logging.info(
      'Train step compiled. Memory per device: arguments %.1f MiB, outputs %.1f MiB, '
      'temporaries %.1f MiB, donated and reused %.1f MiB, generated code %.1f MiB.',
      mib(stats.argument_size_in_bytes), mib(stats.output_size_in_bytes),
      mib(stats.temp_size_in_bytes), mib(stats.alias_size_in_bytes),
      mib(stats.generated_code_size_in_bytes))
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _memory_use(compiled_bytes: Optional[int]) -> dict[str, float]:
  """Memory for metrics.jsonl: XLA's plan per device, and the measured peak.

  peak_memory_bytes is the accelerator's peak bytes in use where the runtime
  reports it (GPU, TPU), else this process's peak resident memory (CPU).
  """
  out = {} if compiled_bytes is None else {'compiled_memory_bytes': float(compiled_bytes)}
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_memory_bytes'] = float(stats['peak_bytes_in_use'])
  else:
    out['peak_memory_bytes'] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return out


class _Evaluator:
  """Summed metrics of params over the first `config.num_eval_steps` eval batches."""

  def __init__(self, config, tokenizer, graphdef, mesh, rules, param_shardings, *,
               seq2seq: bool, synthetic: bool):
    self.seq_len = config.eval_seq_len if config.eval_seq_len > 0 else config.seq_len
    self.num_steps = config.num_eval_steps
    self.synthetic = synthetic
    self.dataset = data.build_eval_iterator(config, tokenizer, seq_len=self.seq_len)
    self.batches = _Batches(config, mesh, rules, seq2seq=seq2seq)
    self.mesh, self.rules = mesh, rules
    settings = steps.StepSettings.from_config(
        config, seq2seq=seq2seq, exact_match=synthetic,
        token_byte_lengths=None if synthetic else tokenizer.token_byte_lengths)
    self._step = jax.jit(steps.make_eval_step(graphdef, settings),
                         in_shardings=(param_shardings, self.batches.shardings(self.seq_len)),
                         out_shardings=_replicated(mesh))

  def __call__(self, params) -> dict[str, float]:
    total = None
    with sharding.axis_rules(self.mesh, self.rules):
      for index, batch in enumerate(self.dataset):
        if index == self.num_steps:
          break
        sums = self._step(params, self.batches.global_batch(batch))
        total = sums if total is None else {
            key: value if key == 'mean_span' else total[key] + value
            for key, value in sums.items()}
    if total is None:
      raise ValueError('The eval split gave no batches; check config.dataset.split_eval.')
    summary = metrics.summarize(jax.device_get(total), with_bits_per_byte=not self.synthetic)
    summary['seq_len'] = self.seq_len
    return summary


class _Profiler:
  """Traces `profile_steps` steps, from a run's second step on, into `logdir`.

  The first step of a run is skipped: it pays for warm-up. Open the trace with
  TensorBoard's profile plugin or Perfetto (`*.trace.json.gz`).
  """

  def __init__(self, profile_steps: int, logdir: str):
    self.profile_steps = profile_steps
    self.logdir = logdir
    self.tracing = False

  def before(self, step: int, start_step: int, state):
    first = start_step + 2
    if self.profile_steps and step == first:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
    elif self.tracing and step == first + self.profile_steps:
      jax.block_until_ready(state)
      self._stop()

  def _stop(self):
    jax.profiler.stop_trace()
    self.tracing = False
    logging.info('Profile of %d steps written to %s.', self.profile_steps, self.logdir)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self.tracing:
      self._stop()


def _check_finite(unchecked: Optional[tuple[int, Any]], checkpoints):
  """Raises FloatingPointError if that step's loss, gradients or parameters are not finite."""
  if unchecked is None:
    return
  step, finite = unchecked
  if not bool(finite):
    checkpoints.wait()
    raise FloatingPointError(
        f'Training stopped at step {step}: the loss, the gradients or the updated '
        f'parameters contain NaN or Inf. The last good checkpoint is step '
        f'{checkpoints.latest_step()} in {checkpoints.directory} (nothing later was saved). '
        f'Lower config.learning_rate, raise config.warmup_steps or set config.grad_clip.')


def _every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0


def _format(summary) -> str:
  return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
