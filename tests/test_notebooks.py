"""Every Colab notebook runs top to bottom, at tiny settings, so none of them rots.

Each `colab/*.ipynb` is executed with nbclient in a fresh ipykernel (this
interpreter: jupyter_client starts the 'python3' kernel with sys.executable)
whose working directory is the repository root, with LONGJAX_NOTEBOOK_TINY=1:
the notebooks' parameter cells then choose `:tiny` configs and a few steps.
A cell that raises fails the test with the cell and its traceback; the
outputs each notebook exists for (plots, samples, scores) must be there too.
The notebooks are stored without outputs; this test never writes them back.
"""
import glob
import os

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO_ROOT, 'colab', '*.ipynb')))

# What each notebook must have shown: (output kind, text in it, at least how many).
EXPECTED = {
    'quickstart': [('image/png', '', 2), ('text', "--- prompt 'def '", 1),
                   ('text', 'bits/byte', 1)],
    'compare_attention': [('image/png', '', 4), ('text/html', '<th>accuracy</th>', 1),
                          ('text', 'runs.csv', 1)],
    'long_document_summarization': [('image/png', '', 1), ('text', 'rouge1', 1),
                                    ('text', 'prediction:', 1)],
}


def _outputs(nb):
  """(kind, text) of every output: kind is a MIME type, or 'text' for streams and plain text."""
  for cell in nb.cells:
    for output in cell.get('outputs', []):
      if output.output_type == 'stream':
        yield 'text', output.text
      elif output.output_type in ('display_data', 'execute_result'):
        for mime, value in output.data.items():
          yield ('text' if mime == 'text/plain' else mime), (
              value if isinstance(value, str) else '')


def test_notebooks_found():
  assert {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS} == set(EXPECTED)


def test_notebooks_stored_without_outputs():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, (
            f'{os.path.basename(path)}: clear the outputs before committing.')


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_runs(path, monkeypatch):
  # The kernel inherits this environment.
  monkeypatch.setenv('LONGJAX_NOTEBOOK_TINY', '1')
  # Tiny programs: XLA's CPU optimisations cost seconds of compile time each.
  monkeypatch.setenv('XLA_FLAGS', ' '.join(
      filter(None, [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0'])))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': REPO_ROOT}})
  client.execute()  # Raises CellExecutionError (with the traceback) if a cell fails.

  outputs = list(_outputs(nb))
  for kind, text, count in EXPECTED[os.path.splitext(os.path.basename(path))[0]]:
    found = sum(1 for k, value in outputs if k == kind and text in value)
    assert found >= count, (f'{os.path.basename(path)}: expected {count} {kind} output(s) '
                            f'containing {text!r}, found {found}.')
