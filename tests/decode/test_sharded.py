"""Generation on a (data, tensor) mesh of 4 CPU devices equals one device.

Runs in a subprocess: the host platform's device count is fixed when jax starts.
"""
import os
import subprocess
import sys
import textwrap

import pytest

# Runs in a 4-device subprocess.
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent('''
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from longjax import decode, sharding
    from tests.decode import helpers

    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, sequence=1))

    def place(params):
        """Every weight laid out by its logical axis names, as the trainer does."""
        def put(var):
            spec = sharding.logical_to_spec(var.get_metadata()['logical_axes'], var.shape, mesh)
            return var.replace(jax.device_put(var[...], NamedSharding(mesh, spec)))
        return jax.tree.map(put, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    lm = helpers.build(helpers.tiny('global_local', positions='t5_bias'))
    graphdef, params = helpers.split(lm)
    prompt, lengths = helpers.tokens(0, (4, 13)), np.array([13, 9, 5, 1])
    for beam_size in (1, 3):
        settings = decode.DecodeSettings(max_decode_len=12, beam_size=beam_size, eos_id=None)
        alone = decode.generate(graphdef, params, prompt, lengths, settings=settings)
        spread = decode.generate(graphdef, place(params), prompt, lengths, settings=settings,
                                 mesh=mesh)
        np.testing.assert_array_equal(spread.tokens, alone.tokens)
        np.testing.assert_allclose(spread.scores, alone.scores, rtol=1e-4)

    seq2seq = helpers.build(helpers.tiny('local', arch='encoder_decoder',
                                         attention=dict(decoder_kind='local')))
    graphdef, params = helpers.split(seq2seq)
    source = helpers.tokens(1, (4, 11))
    segment_ids = (np.arange(11)[None] < np.array([[11], [4], [8], [2]])).astype(np.int32)
    settings = decode.DecodeSettings(max_decode_len=9, beam_size=2, eos_id=None)
    alone = decode.generate_seq2seq(graphdef, params, source, segment_ids, settings=settings)
    spread = decode.generate_seq2seq(graphdef, place(params), source, segment_ids,
                                     settings=settings, mesh=mesh)
    np.testing.assert_array_equal(spread.tokens, alone.tokens)
    print('SHARDED OK')
''')


def test_sharded_generation_equals_single_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and 'SHARDED OK' in result.stdout, result.stderr[-4000:]
