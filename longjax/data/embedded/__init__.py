"""Embedded datasets: tfds builders that build from text already on the machine.

Importing this package registers them with tfds, so `tfds.builder(name)` and
`tfds.data_source(name)` work for these names like for any tfds dataset. Each
builds at first use (`download_and_prepare(file_format='array_record')`, a few
seconds) into the tfds data dir, downloads nothing, and records where its text
came from in the dataset's metadata (`builder.info.metadata`).

  longjax_pystdlib     the stdlib's source files as long documents (pretraining)
  longjax_pydocs       definition/module source -> its docstring (summarization)
  longjax_bible_en_es  World English Bible -> Reina-Valera 1909 (translation)
"""
from longjax.data.embedded.bible_en_es import BibleConfig
from longjax.data.embedded.bible_en_es import LongjaxBibleEnEs
from longjax.data.embedded.pydocs import LongjaxPydocs
from longjax.data.embedded.pydocs import PydocsConfig
from longjax.data.embedded.pystdlib import LongjaxPystdlib
from longjax.data.embedded.pystdlib import StdlibConfig

# Name -> builder class (the tfds name is the class name in snake case).
BUILDERS = {builder.name: builder for builder in (LongjaxPystdlib, LongjaxPydocs, LongjaxBibleEnEs)}

__all__ = ['BUILDERS', 'BibleConfig', 'LongjaxBibleEnEs', 'LongjaxPydocs', 'PydocsConfig',
           'LongjaxPystdlib', 'StdlibConfig']
