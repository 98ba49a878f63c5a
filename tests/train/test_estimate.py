"""--mode=estimate: the train step's memory plan before anything runs, against measured peaks."""
import json
import logging
import os

import pytest

from longjax.train import estimate
from tests.train import train_testing


def _estimate(tmp_path, *flags):
  env = train_testing.subprocess_env(1)
  return train_testing.run_python(
      ['-m', 'longjax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
       '--mode=estimate', *flags], env=env)


def test_estimate_prints_the_plan_and_runs_nothing(tmp_path):
  result = _estimate(tmp_path / 'small')
  for row in ('parameters', 'optimizer state', 'batch', 'temporaries (peak)', 'step peak',
              'host memory free'):
    assert row in result.stdout, result.stdout
  assert 'verdict            fits' in result.stdout
  assert not os.path.exists(tmp_path / 'small' / 'checkpoints' / '1')
  assert not os.path.exists(tmp_path / 'small' / 'metrics.jsonl')

  # Full attention over 8 x 256k tokens: terabytes of scores; said, with the fixes.
  result = _estimate(tmp_path / 'large', '--config.seq_len=262144',
                     '--config.model.max_len=262144', '--config.model.attention.kind=full')
  assert 'does NOT fit' in result.stdout and 'model.remat' in result.stdout, result.stdout


def test_training_warns_before_the_first_step_when_the_plan_does_not_fit(caplog):
  plan = estimate.MemoryPlan(params=2**30, optimizer_state=2**31, batch=0, temporaries=2**34,
                             outputs_not_donated=0, device_memory=2**34, devices_sharing=1)
  assert plan.fits is False
  with caplog.at_level(logging.WARNING):
    estimate.warn_if_too_large(plan)
  assert 'will probably not fit' in caplog.text and 'mesh.sequence' in caplog.text
  fitting = estimate.MemoryPlan(params=2**20, optimizer_state=2**21, batch=0, temporaries=2**22,
                                outputs_not_donated=0, device_memory=2**34, devices_sharing=8)
  assert fitting.fits is True
  assert estimate.MemoryPlan(1, 1, 1, 1, 0, None, 1).fits is None


_MEASURE = '''
import json, sys
import jax, jax.numpy as jnp
from longjax.train import estimate, setup, trainer
from tests.train import train_testing

def rss(field):
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

config = train_testing.tiny_config(**json.loads(sys.argv[1]))
run = setup.build_run(config, sys.argv[2])
compiled, batches = trainer.compile_train_step(run)
plan = estimate.plan(compiled, run)
state = run.fresh_state()
batch = {k: jax.device_put(jnp.ones(v.shape, v.dtype), v.sharding)
         for k, v in batches.abstract(run.config.data.seq_len).items()}
jax.block_until_ready((state, batch))
with open('/proc/self/clear_refs', 'w') as f:
  f.write('5')  # Resets the peak resident set (VmHWM) to what is resident now.
before = rss('VmRSS')
jax.block_until_ready(compiled(state, batch))
print(json.dumps(dict(planned=plan.temporaries + plan.outputs_not_donated,
                      measured=rss('VmHWM') - before)))
'''

_SHAPES = [
    dict(seq_len=16384, model__max_len=16384, batch_size=1, model__attention__kind='local'),
    dict(seq_len=16384, model__max_len=16384, batch_size=1, model__attention__kind='local',
         model__emb_dim=256, model__mlp_dim=1024, model__remat='full'),
    dict(seq_len=4096, model__max_len=4096, batch_size=2, model__attention__kind='full'),
]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc')
@pytest.mark.parametrize('shape', _SHAPES, ids=['local', 'local-d256-remat', 'full'])
def test_the_plan_is_within_20_percent_of_the_measured_step(shape, tmp_path):
  """What the step allocates beyond its arguments (XLA's temporaries and new outputs)
  against the growth of this process's resident memory while it runs."""
  env = train_testing.subprocess_env(1)
  result = train_testing.run_python(['-c', _MEASURE, json.dumps(shape), str(tmp_path)],
                                    env=env, timeout=900)
  sizes = json.loads(result.stdout.strip().splitlines()[-1])
  assert sizes['planned'] > 2**27, sizes  # Large enough that the runtime's noise is small.
  assert 0.8 <= sizes['measured'] / sizes['planned'] <= 1.2, sizes
