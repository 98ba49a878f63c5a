"""`python -m longjax.main` whose checkpoint of step N fails as on a full disk (ENOSPC).

    python tests/train/fail_save.py 4 --config=... --workdir=...

The failure is raised in the background, where a full disk makes the array
writes fail: in the writes into step N's temporary directory. Steps after N
take at least 0.1 s (a real step's time), so "reported at the next step" is
told apart from "reported at the next save".
"""
import errno
import os
import runpy
import sys

import time

from orbax.checkpoint._src.path import async_path

from longjax.train import metrics


def main():
  step = int(sys.argv[1])
  sys.argv = ['longjax.main'] + sys.argv[2:]
  write_text = async_path.write_text

  async def full_disk(path, text):
    if f'{os.sep}{step}.orbax-checkpoint-tmp' in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await write_text(path, text)

  async_path.write_text = full_disk
  write = metrics.MetricsWriter.write

  def write_slowly(self, at_step, split, values):
    write(self, at_step, split, values)
    if at_step > step:
      time.sleep(0.1)

  metrics.MetricsWriter.write = write_slowly
  runpy.run_module('longjax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
