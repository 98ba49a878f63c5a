"""`python -m longjax.convert` end to end: import, evaluate, fine-tune, export, in subprocesses."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('torch')

from longjax.convert import hf_files  # pylint: disable=g-import-not-at-top
from longjax.models.config import parse_layer_pattern  # pylint: disable=g-import-not-at-top
from tests.convert.test_hf_parity import save_reference  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', LONGJAX_HUGEPAGES='0')
  result = subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_import_evaluate_finetune_export(tmp_path):
  hf, run, out = (str(tmp_path / name) for name in ('hf', 'run', 'out'))
  save_reference('llama', hf)  # vocab 259: the byte tokenizer's
  code, log = _run('longjax.convert', f'--hf_dir={hf}', f'--workdir={run}',
                   '--config=configs/pretrain.py:tiny', '--config.model.dtype=float32')
  assert code == 0, log
  config = os.path.join(run, 'imported_config.py')
  assert f'--config={config}' in log
  code, log = _run('longjax.main', f'--config={config}', f'--workdir={run}', '--mode=eval')
  assert code == 0 and 'eval done | step 0' in log, log
  code, log = _run('longjax.main', f'--config={config}', f'--workdir={run}',
                   '--config.num_train_steps=2', '--config.log_every_steps=1')
  assert code == 0 and 'train done | steps 0->2 of 2' in log, log
  # The export of step 2 has the original's names and shapes, and changed weights.
  code, log = _run('longjax.convert', f'--workdir={run}', f'--to_hf={out}', f'--config={config}')
  assert code == 0, log
  original, tuned = hf_files.TensorReader(hf), hf_files.TensorReader(out)
  assert original.names() == tuned.names()
  assert all(original.shape(n) == tuned.shape(n) for n in original.names())
  assert not np.array_equal(original.get('model.layers.0.self_attn.q_proj.weight'),
                            tuned.get('model.layers.0.self_attn.q_proj.weight'))
  # A second import into the same workdir is refused; a mismatched tokenizer too.
  code, log = _run('longjax.convert', f'--hf_dir={hf}', f'--workdir={run}',
                   '--config=configs/pretrain.py:tiny')
  assert code == 1 and 'already holds a run' in log, log
  code, log = _run('longjax.convert', f'--hf_dir={hf}', f'--workdir={tmp_path / "spm"}',
                   '--config=configs/pretrain.py:tiny', '--config.tokenizer.kind=sentencepiece',
                   '--config.tokenizer.spm_vocab_size=512')
  assert code == 1 and 'has 512 tokens, the checkpoint 259' in log, log
  # Attention conversion at import: the overrides win over the checkpoint's full attention.
  converted = str(tmp_path / 'converted')
  code, log = _run('longjax.convert', f'--hf_dir={hf}', f'--workdir={converted}',
                   '--config=configs/pretrain.py:tiny', '--config.model.dtype=float32',
                   '--config.model.attention.layer_pattern=local,full',
                   '--config.model.attention.radius=16')
  assert code == 0, log
  with open(os.path.join(converted, 'config.json')) as f:
    attention = json.load(f)['model']['attention']
  assert parse_layer_pattern(attention['layer_pattern']) == ('local', 'full')
  assert attention['radius'] == 16
  code, log = _run('longjax.main', f'--config={converted}/imported_config.py',
                   f'--workdir={converted}', '--mode=eval')
  assert code == 0 and 'eval done | step 0' in log, log
  # LoRA on the imported model: only adapters train; the export merges them, so each
  # projection moved by a matrix of rank <= r.
  lora, merged = str(tmp_path / 'lora'), str(tmp_path / 'merged')
  code, log = _run('longjax.convert', f'--hf_dir={hf}', f'--workdir={lora}',
                   '--config=configs/pretrain.py:tiny', '--config.model.dtype=float32',
                   '--config.model.peft.method=lora', '--config.model.peft.rank=2')
  assert code == 0 and 'lora_a' in log, log  # the adapters are listed as new
  code, log = _run('longjax.main', f'--config={lora}/imported_config.py', f'--workdir={lora}',
                   '--config.num_train_steps=3', '--config.learning_rate=0.01')
  assert code == 0, log
  code, log = _run('longjax.convert', f'--workdir={lora}', f'--to_hf={merged}',
                   f'--config={lora}/imported_config.py')
  assert code == 0, log
  tuned = hf_files.TensorReader(merged)
  assert tuned.names() == original.names()
  delta = (tuned.get('model.layers.1.self_attn.q_proj.weight') -
           original.get('model.layers.1.self_attn.q_proj.weight'))
  assert 0 < np.linalg.matrix_rank(delta, tol=1e-6) <= 2
  for name in ('model.embed_tokens.weight', 'model.norm.weight',
               'model.layers.0.input_layernorm.weight'):
    assert np.array_equal(tuned.get(name), original.get(name)), name  # frozen: bitwise

