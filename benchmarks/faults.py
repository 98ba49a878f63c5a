"""Fault injection: kill a training run N times at random moments, resume it each time,
and compare the result with an uninterrupted run.

    python benchmarks/faults.py --faults 50 --out faults.json

The run is `python -m longjax.main --config=configs/tiny.py` with frequent
logs, evals and checkpoints, so random moments fall during steps, evals and
(asynchronous) saves. Each fault is SIGKILL, SIGTERM or SIGINT (drawn at
random, mostly SIGKILL) sent at a uniformly random time into the attempt; the
run is then started again with the same command, until it finishes. At the
end it compares, with an uninterrupted run of the same command:

  * every metric record (step, split and every value that does not measure
    time or memory) — bitwise;
  * every array of the final checkpoint (parameters and optimizer state) — bitwise.

and prints `faults survived / records equal / arrays equal`. Not a test: it
takes minutes (RELIABILITY.md has its figures).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Fields of a record that measure the machine, not the run.
_MEASURED = re.compile(r'(per_sec|memory|bytes|_s$|time|wall|mfu)')
SIGNALS = [signal.SIGKILL] * 6 + [signal.SIGTERM] * 2 + [signal.SIGINT]


def _command(workdir, steps):
  overrides = dict(num_train_steps=steps, checkpoint_every_steps=5, keep_checkpoints=2,
                   log_every_steps=1, eval_every_steps=20, **{'model.dropout_rate': 0.1})
  return ([sys.executable, '-m', 'longjax.main', '--config=configs/tiny.py',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()])


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if 'PYTHONPATH' in env
                                                else []))
  return env


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if not _MEASURED.search(k)} for r in records]


def _final_arrays(workdir, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from longjax.train import setup  # pylint: disable=g-import-not-at-top
  from tests.testing import load_config_module  # pylint: disable=g-import-not-at-top
  config = load_config_module('tiny').get_config()
  config.num_train_steps = steps
  config.model.dropout_rate = 0.1
  step, state = setup.build_run(config, workdir).restore_latest()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--faults', type=int, default=50)
  parser.add_argument('--steps', type=int, default=4000,
                      help='long enough that the faulted run outlives its faults')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max-wait', type=float, default=None,
                      help='latest moment of a fault into an attempt (s); default: the '
                      'measured start-up (imports, data, cached compile) + 8 s of training')
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  base = tempfile.mkdtemp(prefix='longjax_faults_')
  env = _env(os.path.join(base, 'compile_cache'))

  began = time.time()
  reference = os.path.join(base, 'uninterrupted')
  subprocess.run(_command(reference, args.steps), env=env, cwd=REPO, check=True,
                 capture_output=True)
  uninterrupted_s = time.time() - began
  # Start-up with a warm compilation cache: a 1-step run.
  started = time.time()
  subprocess.run(_command(os.path.join(base, 'startup'), 1), env=env, cwd=REPO, check=True,
                 capture_output=True)
  startup_s = time.time() - started
  # Faults from late in start-up (the first dataset build, compiling) to a few
  # seconds of steps, evals and saves.
  min_wait = 0.8 * startup_s
  max_wait = args.max_wait or startup_s + 8.0
  print(f'uninterrupted run: {uninterrupted_s:.1f} s; start-up {startup_s:.1f} s; faults at '
        f'{min_wait:.1f}..{max_wait:.1f} s into each attempt', flush=True)

  workdir = os.path.join(base, 'faulted')
  faults, attempts, exits = [], 0, {}
  while True:
    attempts += 1
    process = subprocess.Popen(_command(workdir, args.steps), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if len(faults) < args.faults:
      wait = rng.uniform(min_wait, max_wait)
      signum = rng.choice(SIGNALS)
      try:
        process.wait(timeout=wait)
      except subprocess.TimeoutExpired:
        process.send_signal(signum)
        faults.append(dict(attempt=attempts, after_s=round(wait, 2),
                           signal=signal.Signals(signum).name))
    _, stderr = process.communicate(timeout=600)
    exits[process.returncode] = exits.get(process.returncode, 0) + 1
    if process.returncode == 0:
      break
    # 143 / 130: stopped after saving. -9, and -15 / -2 for a signal that came before
    # the trainer installed its handlers (imports, data): nothing to save yet.
    stopped = (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 143, 130)
    if process.returncode not in stopped or attempts > 4 * args.faults + 10:
      print(stderr[-4000:])
      raise SystemExit(f'attempt {attempts} failed with status {process.returncode}')
    print(f'fault {len(faults)}: {faults[-1]["signal"]} at {faults[-1]["after_s"]} s '
          f'-> status {process.returncode}', flush=True)

  records_equal = _records(reference) == _records(workdir)
  (ref_step, ref_arrays), (step, arrays) = (_final_arrays(reference, args.steps),
                                            _final_arrays(workdir, args.steps))
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays_equal = (ref_step == step and ref_arrays.keys() == arrays.keys() and all(
      np.array_equal(ref_arrays[k], arrays[k]) for k in ref_arrays))
  result = dict(faults=len(faults), attempts=attempts, exit_statuses=exits,
                records_equal=records_equal, arrays_equal=arrays_equal,
                uninterrupted_s=round(uninterrupted_s, 1), startup_s=round(startup_s, 1),
                max_wait_s=round(max_wait, 1), total_s=round(time.time() - began),
                by_signal={name: sum(f['signal'] == name for f in faults)
                           for name in ('SIGKILL', 'SIGTERM', 'SIGINT')}, fault_log=faults)
  if len(faults) < args.faults:
    print(f'The run finished after {len(faults)} faults: use more --steps for {args.faults}.')
  print('\n| faults survived | records equal | arrays equal |\n| --- | --- | --- |')
  print(f'| {len(faults)} of {len(faults)} ({attempts} attempts) | {records_equal} | '
        f'{arrays_equal} |')
  print(json.dumps({k: v for k, v in result.items() if k != 'fault_log'}))
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  if not (records_equal and arrays_equal):
    raise SystemExit(1)


if __name__ == '__main__':
  main()
