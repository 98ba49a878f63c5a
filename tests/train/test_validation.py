"""Bad input fails before anything compiles, with the config field named."""
import pytest

from tests.train import train_testing
from longjax import hostmem
from longjax.train import trainer
from longjax.train import validation

MESH_1 = {'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 1}


@pytest.mark.slow  # A subprocess.
def test_unknown_config_field_on_the_command_line(tmp_path):
  result = train_testing.run_python(
      ['-m', 'longjax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
       '--config.seq_lenn=64'], env=train_testing.subprocess_env(), check=False)
  assert result.returncode != 0
  assert '--config.seq_lenn' in result.stderr and 'Did you mean "seq_len"' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.slow  # A subprocess.
def test_bad_mesh_on_the_command_line_fails_before_compiling(tmp_path):
  result = train_testing.run_main(tmp_path, env=train_testing.subprocess_env(), check=False,
                                  mesh__data=2)
  assert result.returncode != 0
  assert 'config.mesh' in result.stderr and '2 devices but there are 1' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()
  # main restarted itself with glibc's huge-page tunable (longjax/hostmem.py) first.
  expected = 'yes' if hostmem.environ_with_hugepages({}) is not None else 'no'
  assert f'Large host allocations on transparent huge pages: {expected}.' in result.stderr


@pytest.mark.parametrize('overrides, fields', [
    (dict(mesh__data=2), ['config.mesh', '2 devices but there are 1']),
    (dict(seq_len=256), ['config.seq_len = 256', 'config.model.max_len = 128']),
    (dict(eval_seq_len=512), ['config.eval_seq_len = 512', 'model.max_len']),
    (dict(model__attention__kind='sparse'), ['config.model.attention.kind', "'sparse'"]),
    (dict(model__attention__layer_pattern=('local', 'nope')),
     ['config.model.attention.layer_pattern', "'nope'"]),
    (dict(grad_accum_steps=3), ['config.batch_size = 8', 'config.grad_accum_steps = 3']),
    (dict(model__arch='encoder_decoder'), ['config.model.arch', 'config.dataset.target_key']),
    (dict(lr_schedule='linear'), ['config.lr_schedule', 'cosine']),
    (dict(learning_rate=float('nan')), ['config.learning_rate']),
    (dict(log_every_steps=0), ['config.log_every_steps']),
    (dict(model__attention__kind='global_local', model__attention__global_tokens='marked',
          dataset__name='longjax_pystdlib'),
     ["config.model.attention.global_tokens = 'marked'", "'longjax_pystdlib'", "'prefix'"]),
    (dict(model__attention__kind='multiresolution', dataset__name='longjax_pystdlib'),
     ['multiresolution', 'config.dataset.pack = False']),
])
def test_bad_config_fails_fast_naming_the_field(overrides, fields, tmp_path):
  with pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(train_testing.tiny_config(**overrides), tmp_path)
  for field in fields:
    assert field in str(error.value)
  assert not (tmp_path / 'checkpoints').exists()  # Failed before anything was set up.


def test_all_problems_are_reported_at_once():
  config = train_testing.tiny_config(seq_len=256, weight_decay=-1.0)
  with pytest.raises(ValueError) as error:
    validation.validate_config(config, mesh_shape=MESH_1)
  assert 'config.seq_len' in str(error.value) and 'config.weight_decay' in str(error.value)


@pytest.mark.parametrize('mesh, batch_size, accum, fields', [
    (dict(MESH_1, data=4), 6, 1, ['config.batch_size = 6', 'data x config.mesh.fsdp = 4']),
    (dict(MESH_1, data=2, fsdp=2), 8, 4, ['micro-batch 2', 'config.grad_accum_steps = 4']),
])
def test_batch_not_divisible_by_the_data_parallel_size(mesh, batch_size, accum, fields):
  config = train_testing.tiny_config(batch_size=batch_size, grad_accum_steps=accum)
  with pytest.raises(ValueError) as error:
    validation.validate_config(config, mesh_shape=mesh)
  for field in fields:
    assert field in str(error.value)


def test_batch_shards_must_not_span_processes():
  config = train_testing.tiny_config()
  with pytest.raises(ValueError, match='config.mesh: data x fsdp = 1 must be a multiple of the 2'):
    validation.validate_config(config, mesh_shape=dict(MESH_1, tensor=2), process_count=2)


def test_unknown_model_field_for_notebook_configs():
  config = train_testing.tiny_config()
  with config.unlocked():
    config.model.emb_size = 64
  with pytest.raises(ValueError, match='model.emb_size'):
    validation.validate_config(config, mesh_shape=MESH_1)


def test_a_good_config_passes_as_typed_resolved_values():
  run_config = validation.validate_config(train_testing.tiny_config(batch_size=16),
                                          mesh_shape=dict(MESH_1, data=2, fsdp=4))
  assert run_config.model.emb_dim == 32 and run_config.model.head_dim == 8
  assert run_config.data.eval_seq_len == run_config.data.seq_len == 32  # -1 resolved.
  assert run_config.loop.num_eval_steps == 2 and run_config.optimizer.lr_schedule == 'cosine'
  assert run_config.mesh_shape == dict(MESH_1, data=2, fsdp=4)
  whole_split = validation.validate_config(train_testing.tiny_config(num_eval_steps=-1),
                                           mesh_shape=MESH_1)
  assert whole_split.loop.num_eval_steps is None


def test_marked_global_tokens_pass_on_a_task_that_marks_them():
  config = train_testing.tiny_config(model__attention__kind='global_local',
                                     model__attention__global_tokens='marked')
  assert config.dataset.name == 'passkey'
  run_config = validation.validate_config(config, mesh_shape=MESH_1)
  assert run_config.model.attention.global_tokens == 'marked'


def test_row_aligned_kinds_train_on_unpacked_text():
  config = train_testing.tiny_config(model__attention__kind='multiresolution',
                                     dataset__name='longjax_pystdlib', dataset__pack=False)
  assert validation.validate_config(config, mesh_shape=MESH_1).model.attention.kind == \
      'multiresolution'
