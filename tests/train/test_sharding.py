"""The same training on 8 devices under six meshes matches one device; layouts follow the rules.

The 8-device runs happen in one subprocess (XLA's host platform split into 8
devices); the single-device reference runs in this process.
"""
import json
import os

import jax
import pytest

from tests.train import train_testing
from longjax.train import evaluation
from longjax.train import trainer

# Every test here reads runs made in an 8-device subprocess.
pytestmark = pytest.mark.slow

# fp32 compute so that the comparison measures the sharding, not bf16 rounding.
OVERRIDES = dict(num_train_steps=3, log_every_steps=1, eval_every_steps=3, num_eval_steps=2,
                 checkpoint_every_steps=0, model__dtype='float32')
# sequence8 trains full attention as a ring (from 4 sequence shards on).
MESHES = [{'data': 8}, {'fsdp': 8}, {'data': 2, 'fsdp': 2, 'tensor': 2},
          {'data': 4, 'sequence': 2}, {'sequence': 8}, {'fsdp': 2, 'sequence': 2, 'tensor': 2}]

BLOCK = "['decoder']['blocks'][0]"
# What DEFAULT_RULES give the tiny model (vocab 259 is divisible by nothing,
# so the embedding table is split along `embed` only).
EXPECTED_SPECS = {
    'fsdp8': {
        "['embedder']['token']['table']": [None, 'fsdp'],
        f"{BLOCK}['attention']['wq']": ['fsdp', None, None],
        f"{BLOCK}['attention']['wo']": [None, None, 'fsdp'],
        f"{BLOCK}['mlp']['wi_gate']": ['fsdp', None],
        f"{BLOCK}['mlp']['wo']": [None, 'fsdp'],
        f"{BLOCK}['mlp_norm']['scale']": [None],
    },
    'data2_fsdp2_tensor2': {
        "['embedder']['token']['table']": [None, 'fsdp'],
        f"{BLOCK}['attention']['wq']": ['fsdp', 'tensor', None],
        f"{BLOCK}['attention']['wk']": ['fsdp', 'tensor', None],
        f"{BLOCK}['attention']['wo']": ['tensor', None, 'fsdp'],
        f"{BLOCK}['mlp']['wi_up']": ['fsdp', 'tensor'],
        f"{BLOCK}['mlp']['wo']": ['tensor', 'fsdp'],
        f"{BLOCK}['attention_norm']['scale']": [None],
    },
}


def _name(mesh):
  return '_'.join(f'{axis}{size}' for axis, size in mesh.items())


@pytest.fixture(scope='module')
def mesh_results(tmp_path_factory, compile_cache):
  workdir = tmp_path_factory.mktemp('meshes')
  env = train_testing.subprocess_env(num_devices=8, cache_dir=compile_cache)
  env['MESH_RUN_OVERRIDES'] = json.dumps(OVERRIDES)
  result = train_testing.run_python(
      [os.path.join(train_testing.TESTS_DIR, 'mesh_runs.py'), str(workdir)]
      + [json.dumps(mesh) for mesh in MESHES], env=env, timeout=600)
  line, = [l for l in result.stdout.splitlines() if l.startswith('MESH_RESULTS ')]
  return {_name(r['mesh']): r for r in json.loads(line[len('MESH_RESULTS '):])}


@pytest.fixture(scope='module')
def single_device_metrics(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_device')
  trainer.train_and_evaluate(train_testing.tiny_config(**OVERRIDES), workdir)
  return train_testing.read_metrics(workdir)


@pytest.mark.parametrize('mesh', [_name(m) for m in MESHES])
def test_losses_match_one_device(mesh, mesh_results, single_device_metrics):
  expected = single_device_metrics
  actual = mesh_results[mesh]['metrics']
  assert [(r['step'], r['split']) for r in actual] == [(r['step'], r['split']) for r in expected]
  for a, b in zip(expected, actual):
    assert b['loss'] == pytest.approx(a['loss'], rel=2e-5, abs=1e-6), (a, b)
    assert b['accuracy'] == pytest.approx(a['accuracy'], abs=1e-6)
    if a['split'] == 'train':  # The gradients, not only the forward pass.
      assert b['grad_norm'] == pytest.approx(a['grad_norm'], rel=1e-4), (a, b)


@pytest.mark.parametrize('mesh', sorted(EXPECTED_SPECS))
def test_parameter_and_optimizer_layouts_follow_the_rules(mesh, mesh_results):
  result = mesh_results[mesh]
  for path, spec in EXPECTED_SPECS[mesh].items():
    assert _strip(result['param_specs'][path]) == _strip(spec), path
  assert result['mu_specs'] == result['param_specs']  # Adam moments live with their weights.


def test_replicated_meshes_keep_parameters_whole(mesh_results):
  for mesh in ('data8', 'data4_sequence2'):
    assert all(not _strip(spec) for spec in mesh_results[mesh]['param_specs'].values())


def test_checkpoint_from_8_devices_evaluates_on_1(mesh_results, tmp_path):
  result = mesh_results['data2_fsdp2_tensor2']
  final_eval = [r for r in result['metrics'] if r['split'] == 'eval'][-1]
  summary = evaluation.evaluate(train_testing.tiny_config(**OVERRIDES), result['workdir'])
  assert jax.device_count() == 1
  assert summary['loss'] == pytest.approx(final_eval['loss'], rel=1e-5)


def _strip(spec):
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return spec
