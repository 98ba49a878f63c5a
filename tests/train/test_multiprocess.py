"""Two processes on localhost (jax.distributed, CPU collectives over gloo) train and save;
one process restores the checkpoint and evaluates it."""
import socket
import subprocess
import sys

import pytest

from tests.train import train_testing
from longjax.train import evaluation

# Two training processes over localhost.
pytestmark = pytest.mark.slow

OVERRIDES = dict(num_train_steps=4, log_every_steps=2, eval_every_steps=4, num_eval_steps=2,
                 checkpoint_every_steps=0, mesh__data=2, mesh__fsdp=2,
                 model__dtype='float32')  # Compared across meshes: no bf16 rounding.


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_and_one_restores(tmp_path, compile_cache):
  env = train_testing.subprocess_env(num_devices=2, cache_dir=compile_cache)
  port = _free_port()
  processes = [
      subprocess.Popen(
          [sys.executable, '-m', 'longjax.main', '--config=configs/tiny.py',
           f'--workdir={tmp_path}', f'--coordinator_address=localhost:{port}',
           '--num_processes=2', f'--process_id={index}']
          + train_testing.overrides_to_flags(**OVERRIDES),
          cwd=train_testing.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True)
      for index in range(2)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=300))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-4000:]
  assert 'JAX process 1 of 2, 2 local devices' in outputs[1][1]

  # Only process 0 wrote metrics: one record per (step, split).
  records = train_testing.read_metrics(tmp_path)
  assert [(r['step'], r['split']) for r in records] == [(2, 'train'), (4, 'train'),
                                                       (4, 'eval')]
  # Each process saved its shards and its data position.
  assert sorted((tmp_path / 'checkpoints' / '4' / 'data').iterdir()) == [
      tmp_path / 'checkpoints' / '4' / 'data' / name
      for name in ('commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json')]

  # This process (1 process, 1 device) restores the 4-device checkpoint.
  config = train_testing.tiny_config(**dict(OVERRIDES, mesh__data=-1, mesh__fsdp=1))
  summary = evaluation.evaluate(config, tmp_path)
  assert summary['loss'] == pytest.approx(records[-1]['loss'], rel=1e-5)
