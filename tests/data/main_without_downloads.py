"""`python -m longjax.main` in which downloading a tfds dataset is an error (tests run offline).

    python tests/data/main_without_downloads.py --config=... --workdir=...

The embedded datasets still build (from text on this machine); any other
`DatasetBuilder.download_and_prepare` exits with status 3 and says
"<name> would be downloaded", so a test never reaches the network.
"""
import runpy
import sys

import tensorflow_datasets as tfds

from longjax.data import embedded


def main():
  prepare = tfds.core.DatasetBuilder.download_and_prepare

  def refuse(self, *args, **kwargs):
    if self.name in embedded.BUILDERS:  # Built from text on this machine.
      return prepare(self, *args, **kwargs)
    sys.stderr.write(f'TEST: {self.name} would be downloaded\n')
    sys.exit(3)

  tfds.core.DatasetBuilder.download_and_prepare = refuse
  sys.argv = ['longjax.main'] + sys.argv[1:]
  runpy.run_module('longjax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
