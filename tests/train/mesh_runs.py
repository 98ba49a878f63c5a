"""Runs the same tiny training on several meshes in one process; prints JSON results.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/mesh_runs.py \
        WORKDIR '{"data": 8}' '{"fsdp": 8}' ...

For each mesh (unnamed axes are 1): the train and eval records of
metrics.jsonl and the PartitionSpec of every parameter and Adam moment.
"""
import json
import os
import sys

import jax

from tests.train import train_testing
from longjax.train import trainer

AXES = ('data', 'fsdp', 'tensor', 'sequence')


def specs(tree):
  return {jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a
                                       for a in leaf.sharding.spec]
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(workdir, *meshes):
  results = []
  for mesh_json in meshes:
    mesh = json.loads(mesh_json)
    overrides = {f'mesh__{axis}': mesh.get(axis, 1) for axis in AXES}
    name = '_'.join(f'{axis}{size}' for axis, size in mesh.items())
    run_dir = os.path.join(workdir, name)
    state = trainer.train_and_evaluate(
        train_testing.tiny_config(**overrides, **json.loads(os.environ['MESH_RUN_OVERRIDES'])),
        run_dir)
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw -> ScaleByAdamState
    results.append({'mesh': mesh, 'workdir': run_dir, 'metrics': train_testing.read_metrics(run_dir),
                    'param_specs': specs(state.params), 'mu_specs': specs(adam.mu)})
  print('MESH_RESULTS ' + json.dumps(results))


if __name__ == '__main__':
  main(*sys.argv[1:])
