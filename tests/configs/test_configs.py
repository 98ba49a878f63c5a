"""Every task config and config argument: loads, builds its model abstractly,
is consistent with its mesh; and one training step of each small config."""
import importlib
import json

import jax
import numpy as np
import pytest
from flax import nnx

from longjax import attention, data, models
from longjax.configs import base
from longjax.data import sources
from longjax.train import trainer, validation

TASKS = ('pretrain', 'translate', 'summarize', 'passkey', 'associative_recall', 'ruler')
# Devices each real-scale variant is written for (see the config docstrings).
REAL_SCALE_DEVICES = {'pg19': 16, 'wmt14': 8, 'arxiv': 16, 'long': 8}


def task(name):
  return importlib.import_module(f'longjax.configs.{name}')


def sizes(name):
  return tuple(getattr(task(name), 'SIZES', task('passkey').SIZES))


def resolved_mesh(config, devices):
  shape = {axis: int(config.mesh[axis]) for axis in ('data', 'fsdp', 'tensor', 'sequence')}
  free = [a for a, s in shape.items() if s == -1]
  fixed = int(np.prod([s for s in shape.values() if s != -1]))
  if free:
    shape[free[0]] = devices // fixed
  assert int(np.prod(list(shape.values()))) == devices, (shape, devices)
  return shape


ARGS = [(name, arg) for name in TASKS
        for arg in [''] + list(attention.KINDS) + list(sizes(name))]


@pytest.mark.parametrize('name,arg', ARGS, ids=[f'{n}:{a}' for n, a in ARGS])
def test_config_builds_and_is_consistent(name, arg):
  config = task(name).get_config(arg)
  kind, size = base.parse_arg(arg, sizes(name))
  if kind:
    assert config.model.attention.kind == kind
  devices = REAL_SCALE_DEVICES.get(size, 1)
  mesh = resolved_mesh(config, devices)
  processes = max(1, devices // 4)  # e.g. 4 chips per TPU host
  run_config = validation.validate_config(config, mesh_shape=mesh, process_count=processes)
  abstract = nnx.eval_shape(lambda: models.build(run_config.model, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert params and all(isinstance(p, jax.ShapeDtypeStruct) for p in params)
  assert config.seq_len <= config.model.max_len
  assert (config.model.arch == 'encoder_decoder') == bool(config.dataset.target_key)
  data_config = data.DataConfig.from_config(config)
  if not data_config.synthetic:
    dataset = data_config.dataset
    builder = sources.get_builder(dataset)
    keys = [dataset.input_key] + [dataset.target_key] * bool(dataset.target_key)
    assert set(keys) <= set(builder.info.features.keys())


@pytest.mark.parametrize('ruler_task', data.RULER_TASKS)
def test_each_ruler_task_config_makes_rows_of_its_length(ruler_task):
  from longjax.data import synthetic, tokenizers
  config = task('ruler').get_config(f'{ruler_task},global_local')
  assert config.dataset.name == ruler_task and config.model.attention.kind == 'global_local'
  data_config = data.DataConfig.from_config(config)
  row = synthetic.make_task(data_config, tokenizers.ByteTokenizer(), split='eval',
                            seq_len=config.seq_len)[0]
  assert row['inputs'].shape == (config.seq_len,) and row['weights'].sum() > 0
  with pytest.raises(ValueError, match='one task'):
    task('ruler').get_config('niah_single,common_words')


def test_unknown_config_argument_lists_the_valid_words():
  with pytest.raises(ValueError, match='attention kind .*full.* and/or a size .*small, tiny, pg19'):
    task('pretrain').get_config('huge')


def test_docstrings_show_the_launch_command():
  for name in TASKS:
    assert f'python -m longjax.main --config=configs/{name}.py' in task(name).__doc__


@pytest.mark.slow
@pytest.mark.parametrize('name', TASKS)
def test_one_training_step_of_each_small_config(name, tmp_path, data_dir):
  config = task(name).get_config()
  config.dataset.data_dir = data_dir
  config.num_train_steps = 1
  config.num_eval_steps = 1
  config.eval_every_steps = 1
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert {r['split'] for r in records} >= {'train', 'eval'}
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
