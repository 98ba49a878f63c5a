"""Files a run writes whole (config.json, decode predictions): never seen half-written."""
from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary file and a rename.

  A reader (an experiment script, a second process) sees the old file or the
  new one, never a part: os.replace is atomic on POSIX and Windows.
  """
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
