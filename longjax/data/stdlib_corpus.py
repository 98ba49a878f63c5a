"""The Python standard library as a text corpus: its files, their split, their docstrings.

Both stdlib datasets (`longjax_pystdlib` for pretraining, `longjax_pydocs` for
summarization) read the interpreter's own standard library, so they need
nothing but Python. Files under `test`/`tests` folders and `test_*.py` are left
out: they are a different genre (and 20 MB of them would dominate the corpus).

A file's split depends only on a hash of its path relative to the stdlib root,
never on its content, so a file keeps its split across Python patch versions,
and the two datasets agree: no docstring in `longjax_pydocs`' validation split
comes from a file that `longjax_pystdlib` trains on.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import sys
import sysconfig
import textwrap
from typing import Iterator, Optional

# Folders that hold tests, test data, or code that is not the stdlib's own.
EXCLUDED_DIRS = frozenset(
    {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__'})

# One file in this many goes to validation (10%).
VALIDATION_MODULUS = 10


def stdlib_dir() -> str:
  """The folder holding the running interpreter's standard library."""
  return sysconfig.get_paths()['stdlib']


def python_version() -> str:
  return '.'.join(str(part) for part in sys.version_info[:3])


def path_hash(relative_path: str) -> int:
  """A stable hash of a path (Python's `hash` is salted per process)."""
  digest = hashlib.sha256(relative_path.replace(os.sep, '/').encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big')


def split_of(relative_path: str) -> str:
  return 'validation' if path_hash(relative_path) % VALIDATION_MODULUS == 0 else 'train'


def split_generators(paths: list[str], generate) -> dict:
  """{split: generate(paths of that split)}, leaving out empty splits (tfds rejects them).

  Only a sample (`max_files`) or a custom stdlib_dir can leave a split empty.
  """
  by_split = {}
  for path in paths:
    by_split.setdefault(split_of(path), []).append(path)
  return {split: generate(split_paths) for split, split_paths in sorted(by_split.items())}


def list_source_files(root: Optional[str] = None, max_files: Optional[int] = None) -> list[str]:
  """Relative paths ('/'-separated) of the non-test `.py` files under `root`, sorted.

  `max_files` keeps a deterministic sample: the files with the smallest path
  hashes, so a small sample still falls into both splits in proportion.
  """
  root = root or stdlib_dir()
  paths = []
  for folder, subfolders, files in os.walk(root):
    # Pruning in place stops os.walk from descending into excluded folders.
    subfolders[:] = sorted(
        name for name in subfolders
        if name not in EXCLUDED_DIRS and not name.startswith('config-'))
    for name in files:
      if name.endswith('.py') and not name.startswith('test_') and name != 'conftest.py':
        relative = os.path.relpath(os.path.join(folder, name), root)
        paths.append(relative.replace(os.sep, '/'))
  paths.sort()
  if max_files is not None:
    paths = sorted(sorted(paths, key=path_hash)[:max_files])
  return paths


def read_source(root: str, relative_path: str) -> Optional[str]:
  """The file's text, or None when it is not UTF-8 (none is, in CPython 3.11)."""
  with open(os.path.join(root, relative_path), 'rb') as f:
    data = f.read()
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    return None


@dataclasses.dataclass(frozen=True)
class DocstringPair:
  """A piece of source code (docstrings removed) and the docstring it had."""
  name: str  # Qualified name, e.g. 'json.decoder.JSONDecoder.decode'.
  kind: str  # 'module', 'class', 'function' or 'async_function'.
  source: str
  docstring: str


_KINDS = {ast.ClassDef: 'class', ast.FunctionDef: 'function', ast.AsyncFunctionDef: 'async_function'}
_DOCUMENTABLE = (ast.Module, *_KINDS)
_HOLDS_DEFINITIONS = (ast.stmt, ast.excepthandler, ast.match_case)


def module_name(relative_path: str) -> str:
  name = relative_path[:-len('.py')].replace('/', '.')
  return name[:-len('.__init__')] if name.endswith('.__init__') else name


def extract_docstring_pairs(text: str, relative_path: str) -> Iterator[DocstringPair]:
  """Yields the module and every documented class/function of a source file.

  The source side of every pair has *all* docstrings removed, not only its own:
  a class keeps its methods, and their docstrings would otherwise give away
  much of the class docstring.
  """
  tree = ast.parse(text)
  encoded = text.encode('utf-8')
  # ast offsets are (line, UTF-8 byte column); turn them into byte offsets.
  line_starts = [0]
  for line in encoded.splitlines(keepends=True):
    line_starts.append(line_starts[-1] + len(line))

  def offset(line: int, column: int) -> int:
    return line_starts[line - 1] + column

  docstring_spans = []  # Byte spans of every docstring expression.
  documented = []  # (node, qualified name) of every node with a docstring.

  def walk(node, name):
    body = getattr(node, 'body', None)
    if (isinstance(node, _DOCUMENTABLE) and body and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
      expr = body[0]
      docstring_spans.append((offset(expr.lineno, expr.col_offset),
                              offset(expr.end_lineno, expr.end_col_offset)))
      documented.append((node, name))
    for child in ast.iter_child_nodes(node):
      # Definitions nested in if/try/with blocks count too, under the same name;
      # expressions hold no definitions (lambdas have no docstrings).
      if isinstance(child, _HOLDS_DEFINITIONS):
        walk(child, f'{name}.{child.name}' if isinstance(child, tuple(_KINDS)) else name)

  walk(tree, module_name(relative_path))
  docstring_spans.sort()

  for node, name in documented:
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or not docstring.strip():
      continue
    if isinstance(node, ast.Module):
      start, end, kind = 0, len(encoded), 'module'
    else:
      first_line = min([node.lineno] + [d.lineno for d in node.decorator_list])
      start, end = line_starts[first_line - 1], offset(node.end_lineno, node.end_col_offset)
      kind = _KINDS[type(node)]
    source = _remove_spans(encoded, start, end, docstring_spans).decode('utf-8')
    source = textwrap.dedent(source).strip('\n')
    if source.strip():
      yield DocstringPair(name=name, kind=kind, source=source + '\n', docstring=docstring)


def _remove_spans(encoded: bytes, start: int, end: int, spans) -> bytes:
  """encoded[start:end] without the spans; a span alone on its lines takes the lines."""
  pieces, cursor = [], start
  for span_start, span_end in spans:
    if span_start < start or span_end > end:
      continue
    line_start = encoded.rfind(b'\n', 0, span_start) + 1
    if not encoded[line_start:span_start].strip():
      span_start = max(line_start, cursor)
    line_end = encoded.find(b'\n', span_end)
    line_end = len(encoded) if line_end < 0 else line_end
    if not encoded[span_end:line_end].strip():
      span_end = min(line_end + 1, end)
    pieces.append(encoded[cursor:span_start])
    cursor = span_end
  pieces.append(encoded[cursor:end])
  return b''.join(pieces)
