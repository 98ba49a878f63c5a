"""Every Colab notebook runs top to bottom, at tiny settings, so none of them rots; and
its install cell gets longjax both inside a checkout and, by cloning, outside one.

Each `colab/*.ipynb` is executed with nbclient in a fresh ipykernel (this
interpreter: jupyter_client starts the 'python3' kernel with sys.executable)
whose working directory is colab/ (where Jupyter starts for a notebook), with
LONGJAX_NOTEBOOK_TINY=1: the notebooks' parameter cells then choose `:tiny`
configs and a few steps. LONGJAX_NOTEBOOK_DRY_INSTALL=1 makes the install cell
print its pip command instead of running it, so no test changes this
environment. A cell that raises fails the test with the cell and its traceback;
the outputs each notebook exists for (plots, samples, scores) must be there too.
The notebooks are stored without outputs; this test never writes them back.
"""
import glob
import json
import os
import shutil
import subprocess

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
  monkeypatch.setenv('LONGJAX_NOTEBOOK_DRY_INSTALL', '1')
  # Tiny programs: XLA's CPU optimisations cost seconds of compile time each.
  monkeypatch.setenv('XLA_FLAGS', ' '.join(
      filter(None, [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0'])))
  nb = nbformat.read(path, as_version=4)
  # Started in colab/: the install cell finds the checkout above it (the in-checkout path).
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.dirname(path)}})
  client.execute()  # Raises CellExecutionError (with the traceback) if a cell fails.

  outputs = list(_outputs(nb))
  for kind, text, count in EXPECTED[os.path.splitext(os.path.basename(path))[0]]:
    found = sum(1 for k, value in outputs if k == kind and text in value)
    assert found >= count, (f'{os.path.basename(path)}: expected {count} {kind} output(s) '
                            f'containing {text!r}, found {found}.')


# The install cell, outside a checkout: it clones LONGJAX_REPO (a bare repository of this
# tree here, as a user would give the URL they cloned from) or, if that is empty, says so.

def _setup_notebook(path, repo_url):
  """The notebook's first two code cells, LONGJAX_REPO set to repo_url, then a cell that
  prints where the checkout is, the working directory and where longjax imports from."""
  nb = nbformat.read(path, as_version=4)
  param, install = [cell for cell in nb.cells if cell.cell_type == 'code'][:2]
  param.source = param.source.replace("LONGJAX_REPO = ''", f'LONGJAX_REPO = {repo_url!r}')
  probe = nbformat.v4.new_code_cell(
      'import json, longjax\n'
      'print(json.dumps([REPO_ROOT, os.getcwd(), os.path.abspath(longjax.__file__)]))')
  nb.cells = [param, install, probe]
  return nb


def _run_in(nb, directory):
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(directory)}}).execute()
  return ''.join(text for kind, text in _outputs(nb) if kind == 'text')


def _outside_any_checkout(tmp_path):
  """A fresh folder standing in for Colab's /content: no checkout at or above it."""
  home = tmp_path / 'content'
  home.mkdir()
  for folder in [home, *home.parents]:
    assert not (folder / 'setup.py').is_file() or not (folder / 'longjax').is_dir(), folder
  return home


def test_notebooks_share_one_install_cell_and_invent_no_url():
  cells = []
  for path in NOTEBOOKS:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    assert 'github.com/longjax' not in text, os.path.basename(path)
    nb = nbformat.reads(text, as_version=4)
    param, install = [cell for cell in nb.cells if cell.cell_type == 'code'][:2]
    assert "LONGJAX_REPO = ''  # e.g. the URL you cloned longjax from" in param.source
    cells.append(install.source)
  assert len(set(cells)) == 1, 'the install cells differ; keep them the same in every notebook'


@pytest.fixture(scope='module')
def bare_repository(tmp_path_factory):
  """A bare git repository holding one commit of this working tree, notebooks included."""
  root = tmp_path_factory.mktemp('origin')
  tree = root / 'tree'
  shutil.copytree(REPO_ROOT, tree, ignore=shutil.ignore_patterns(
      '.git', '.venv', '__pycache__', '*.egg-info', '.pytest_cache', 'build', 'dist',
      'workdirs', 'tmp', '.ipynb_checkpoints'))
  git = ['git', '-c', 'user.name=longjax tests', '-c', 'user.email=tests@localhost',
         '-c', 'commit.gpgsign=false', '-c', 'init.defaultBranch=main']
  for args in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'working tree']):
    subprocess.run(git + args, cwd=tree, check=True, capture_output=True)
  bare = root / 'longjax.git'
  subprocess.run(['git', 'clone', '-q', '--bare', str(tree), str(bare)], check=True,
                 capture_output=True)
  return str(bare)


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_install_cell_clones_longjax_repo_outside_a_checkout(path, bare_repository, tmp_path,
                                                             monkeypatch):
  monkeypatch.setenv('LONGJAX_NOTEBOOK_DRY_INSTALL', '1')
  home = _outside_any_checkout(tmp_path)
  nb = _setup_notebook(path, bare_repository)
  printed = _run_in(nb, home)
  clone = home / 'longjax'
  with open(path, encoding='utf-8') as ours, open(clone / 'colab' / os.path.basename(path),
                                                  encoding='utf-8') as cloned:
    assert cloned.read() == ours.read()
  assert f'pip install -q -e {clone}' in printed  # The clone, with a [tpu]/[cuda] extra or not.
  repo_root, cwd, module = json.loads(nb.cells[-1].outputs[-1].text)
  assert repo_root == cwd == str(clone)
  assert module == str(clone / 'longjax' / '__init__.py')  # This kernel uses the clone.


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_install_cell_outside_a_checkout_without_longjax_repo_says_what_to_set(path, tmp_path,
                                                                               monkeypatch):
  monkeypatch.setenv('LONGJAX_NOTEBOOK_DRY_INSTALL', '1')
  home = _outside_any_checkout(tmp_path)
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    _run_in(_setup_notebook(path, ''), home)
  assert error.value.ename == 'ValueError'
  assert 'set LONGJAX_REPO in the cell above to the git URL' in error.value.evalue
  assert os.listdir(home) == []  # Nothing cloned, nothing installed.
