"""`python -m longjax.main` with jax.distributed.initialize replaced by a recorder (no cluster).

    python tests/main_with_fake_distributed.py --config=... --workdir=... --coordinator_address=...

The keyword arguments main passes to jax.distributed.initialize are printed
to stdout as one JSON line after 'INITIALIZE ', and the process exits 0 there.
"""
import json
import runpy
import sys

import jax


def main():
  def record(**kwargs):
    print('INITIALIZE ' + json.dumps(kwargs, sort_keys=True), flush=True)
    sys.exit(0)

  jax.distributed.initialize = record
  sys.argv = ['longjax.main'] + sys.argv[1:]
  runpy.run_module('longjax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
