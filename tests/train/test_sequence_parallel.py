"""Sequence parallelism (config.mesh.sequence > 1) on 8 CPU devices, in subprocesses.

  * every kind, causal and bidirectional, on meshes sequence=8, data=2 x
    sequence=4 and fsdp=2 x sequence=2 x tensor=2: the output and every
    gradient of a sequence-sharded call equal one device's (to 1e-5 of their
    largest entry);
  * 20 training steps of every kind on sequence=8 and fsdp=2 x sequence=2 x
    tensor=2 give one device's losses (to 1e-5 relative);
  * what moves is asserted from the compiled HLO: global_local,
    transient_global and hierarchical move nothing as long as a shard (and
    hierarchical's bytes hardly grow with the length); local attention's
    collectives carry at most 1.25x the halo minimum (2 x radius x kv_heads x
    head_dim x 4 bytes per direction), at 8 shards and at 4; full attention
    passes one shard's keys around a ring and gathers nothing, causally in the
    zigzag layout that gives every shard the same work; the accelerator
    kernels (interpreted) exchange the same halos;
  * a sequence-sharded model generates what one device generates;
  * a sequence length that splits into partial kernel tiles is refused when
    the config is validated.
"""
import json
import textwrap

import pytest

from longjax.train import validation
from tests.train import train_testing

# Inputs and placement the subprocess scripts share.
COMMON = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding
    from benchmarks import collectives
    from longjax import attention, sharding

    assert jax.device_count() == 8
    L, H, HK, D = 512, 4, 2, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, L, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, L, HK, D)), jnp.float32) for _ in range(2))
    seg = np.ones((2, L), np.int32); seg[0, 120:] = 2; seg[0, 131:] = 3; seg[0, 330:] = 4
    seg[1, 450:] = 0
    seg = jnp.asarray(seg)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def mesh_of(mesh_sizes):
        sizes = dict(dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh_sizes)
        count = int(np.prod(list(sizes.values())))
        return sharding.make_mesh(sizes, devices=jax.devices()[:count])

    def placed(mesh):
        """q, k, v and the segment ids laid out by their logical names on mesh."""
        place = lambda x, names: jax.device_put(x, NamedSharding(
            mesh, sharding.logical_to_spec(names, x.shape, mesh)))
        args = (place(q, ('batch', 'length', 'heads', 'kv')),
                place(k, ('batch', 'length', 'kv_heads', 'kv')),
                place(v, ('batch', 'length', 'kv_heads', 'kv')), place(seg, ('batch', 'length')))
        assert 'sequence' in str(args[0].sharding.spec[1]), args[0].sharding
        return args
''')

EQUALITY = COMMON + textwrap.dedent('''
    mark = jnp.asarray(rng.random((2, L)) < 0.03)
    projections = tuple(jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in (q, k, v))
    kinds = dict(full={}, local=dict(radius=32), chunked=dict(chunk_size=32),
                 global_local=dict(radius=32, num_global=4),
                 global_local_marked=dict(radius=32, num_global=4, global_mask=mark),
                 global_local_projections=dict(radius=32, num_global=4, global_qkv=projections),
                 transient_global=dict(radius=32, summary_block=16,
                                       summary_k=k[:, :32], summary_v=v[:, :32]),
                 hierarchical=dict(level0_block=16), multiresolution=dict(level0_block=16),
                 adaptive_span=dict(max_span=32, span_ramp=8.0,
                                    spans=jnp.asarray([0.0, 5.0, 17.0, 32.0])))
    worst = {}
    for mesh_sizes in json.loads(sys.argv[1]):
        mesh = mesh_of(mesh_sizes)
        args = placed(mesh)
        for kind, settings in kinds.items():
            for causal in (False, True):
                fn = attention.get(kind.replace('_marked', '').replace('_projections', ''))
                forward = jax.jit(lambda q, k, v, s: fn(
                    q, k, v, causal=causal, segment_ids=s, **settings))
                loss = lambda q, k, v, s: jnp.sum(forward(q, k, v, s) * cot)
                grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                want = (forward(q, k, v, seg),) + grad(q, k, v, seg)
                with sharding.axis_rules(mesh):
                    got = (forward(*args),) + grad(*args)
                # The output and every gradient, each to 1e-5 of its largest entry.
                name = f'{kind} causal={causal} {mesh_sizes}'
                error = max(float(jnp.max(jnp.abs(a - b)) / max(1.0, jnp.max(jnp.abs(b))))
                            for a, b in zip(got, want))
                worst[name] = error
                assert error < 1e-5, (name, error)
    print('EQUAL ' + json.dumps(worst))
''')

HALO = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from benchmarks import collectives
    from longjax import attention, sharding

    L, R, HK, D = 16384, 128, 2, 64
    out = {}
    for n in (8, 4):
        mesh = Mesh(np.array(jax.devices()[:n]), ('sequence',))
        rows = NamedSharding(mesh, P(None, 'sequence', None, None))
        q = jax.ShapeDtypeStruct((1, L, 4, D), jnp.float32, sharding=rows)
        kv = jax.ShapeDtypeStruct((1, L, HK, D), jnp.float32, sharding=rows)
        seg = jax.ShapeDtypeStruct((1, L), jnp.int32,
                                   sharding=NamedSharding(mesh, P(None, 'sequence')))
        for causal in (False, True):
            f = lambda q, k, v, s: attention.local(q, k, v, radius=R, causal=causal,
                                                   segment_ids=s, implementation='xla')
            g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
            for mode, fn in (('fwd', f), ('fwd+bwd', g)):
                text = jax.jit(fn).lower(q, kv, kv, seg).compile().as_text()
                out[f'{n} {causal} {mode}'] = dict(bytes=collectives.total_bytes(text),
                                                    ops=sorted(collectives.summary(text)))
        # Full attention: a ring, nothing gathered.
        full_mesh = Mesh(np.array(jax.devices()[:n]).reshape(1, 1, 1, n), sharding.MESH_AXES)
        rows = NamedSharding(full_mesh, P(None, 'sequence', None, None))
        shape = lambda h: jax.ShapeDtypeStruct((1, 4096, h, D), jnp.float32, sharding=rows)
        ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32,
                                   sharding=NamedSharding(full_mesh, P(None, 'sequence')))
        for causal in (False, True):
            f = lambda q, k, v, s: attention.dot_product(q, k, v, causal=causal, segment_ids=s)
            g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
            with sharding.axis_rules(full_mesh):
                text = jax.jit(g).lower(shape(4), shape(HK), shape(HK), ids).compile().as_text()
            out[f'ring {n} {causal}'] = dict(longest=collectives.largest_axis(text),
                                             ops=sorted(collectives.summary(text)))
        # The causal ring's work per shard, in (query chunk, key chunk) pairs of
        # L / 2n: 4 for a whole block, 2 for a zigzag half, 0 for a skipped one.
        from longjax.attention import ring
        cost = jnp.array([4, 2, 2, 0])
        for zigzag in (True, False):
            work = jax.jit(jax.shard_map(
                lambda x, zigzag=zigzag: x + jnp.sum(cost[jnp.stack(
                    [ring._case(t, n, True, zigzag) for t in range(n)])]),
                mesh=mesh, in_specs=P('sequence'), out_specs=P('sequence')))(jnp.zeros(n, int))
            out[f'work {n} {zigzag}'] = [int(w) for w in work]
    print('HALO ' + json.dumps(out))
''')

SMALL_GATHERS = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from benchmarks import collectives
    from longjax import attention, sharding

    L, n, D = 16384, 8, 64
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=n))
    rows = NamedSharding(mesh, P(None, 'sequence', None, None))
    ids = NamedSharding(mesh, P(None, 'sequence'))
    q = jax.ShapeDtypeStruct((1, L, 4, D), jnp.float32, sharding=rows)
    kv = jax.ShapeDtypeStruct((1, L, 2, D), jnp.float32, sharding=rows)
    row = jax.ShapeDtypeStruct((1, L), jnp.int32, sharding=ids)
    summary = jax.ShapeDtypeStruct((1, L // 16, 2, D), jnp.float32,
                                   sharding=NamedSharding(mesh, P()))
    calls = dict(
        global_local=lambda q, k, v, s, m, sk, sv, c: attention.global_local(
            q, k, v, radius=128, num_global=16, causal=c, segment_ids=s),
        global_local_marked=lambda q, k, v, s, m, sk, sv, c: attention.global_local(
            q, k, v, radius=128, num_global=16, causal=c, segment_ids=s, global_mask=m > 0),
        transient_global=lambda q, k, v, s, m, sk, sv, c: attention.transient_global(
            q, k, v, radius=128, summary_block=16, causal=c, segment_ids=s, summary_k=sk,
            summary_v=sv))
    out = {}
    for name, call in calls.items():
        for causal in (False, True):
            f = lambda *a, call=call, causal=causal: call(*a, causal)
            g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
            for mode, fn in (('fwd', f), ('fwd+bwd', g)):
                with sharding.axis_rules(mesh):
                    text = jax.jit(fn).lower(q, kv, kv, row, row, summary, summary).compile(
                        ).as_text()
                out[f'{name} {causal} {mode}'] = dict(longest=collectives.largest_axis(text),
                                                       bytes=collectives.total_bytes(text))
    print('SMALL ' + json.dumps(out))
''')

# hierarchical's levels at two lengths, packed and not: what moves per call.
HIERARCHY = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from benchmarks import collectives
    from longjax import attention, sharding

    n, D = 8, 64
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=n))
    rows = NamedSharding(mesh, P(None, 'sequence', None, None))
    out = {}
    for L in (16384, 65536):
        q = jax.ShapeDtypeStruct((1, L, 4, D), jnp.float32, sharding=rows)
        kv = jax.ShapeDtypeStruct((1, L, 2, D), jnp.float32, sharding=rows)
        row = jax.ShapeDtypeStruct((1, L), jnp.int32,
                                   sharding=NamedSharding(mesh, P(None, 'sequence')))
        for packed in (False, True):
            for causal in (False, True):
                f = lambda q, k, v, s, causal=causal, packed=packed: attention.hierarchical(
                    q, k, v, level0_block=64, causal=causal, segment_ids=s if packed else None)
                g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
                with sharding.axis_rules(mesh):
                    text = jax.jit(g).lower(q, kv, kv, row).compile().as_text()
                out[f'{L} {packed} {causal}'] = dict(longest=collectives.largest_axis(text),
                                                     bytes=collectives.total_bytes(text))
    print('HIERARCHY ' + json.dumps(out))
''')

# 20 steps of the tiny LM, one kind after another, on the meshes given; one
# device when none is.
TRAINING = textwrap.dedent('''
    import json, os, sys
    from tests.train import train_testing
    from longjax.train import trainer

    workdir, kinds = sys.argv[1], sys.argv[2].split(',')
    meshes = json.loads(sys.argv[3]) if len(sys.argv) > 3 else [{}]
    losses = {}
    for mesh in meshes:
        for kind in kinds:
            overrides = dict(
                seq_len=128, model__max_len=256, model__attention__kind=kind,
                model__attention__radius=8, model__attention__num_global=2,
                model__attention__summary_block=8, model__attention__level0_block=8,
                model__attention__chunk_size=8, model__attention__max_span=16,
                model__attention__span_ramp=4.0, model__dtype='float32', batch_size=4,
                num_train_steps=20, log_every_steps=1, eval_every_steps=20, num_eval_steps=1,
                checkpoint_every_steps=0)
            overrides.update({f'mesh__{axis}': mesh.get(axis, 1)
                              for axis in ('data', 'fsdp', 'tensor', 'sequence')})
            name = kind + ''.join(f' {axis}={size}' for axis, size in mesh.items())
            run_dir = os.path.join(workdir, name.replace(' ', '_').replace('=', ''))
            trainer.train_and_evaluate(train_testing.tiny_config(**overrides), run_dir)
            losses[name] = [r['loss'] for r in train_testing.read_metrics(run_dir, 'train')]
    print('LOSSES ' + json.dumps(losses))
''')

KERNEL_HALO = COMMON + textwrap.dedent('''
    R = 24
    out = {}
    for mesh_sizes in ({'sequence': 4}, {'data': 2, 'sequence': 4}):
        mesh = mesh_of(mesh_sizes)
        args = placed(mesh)
        for kind, settings in (('local', dict(radius=R)), ('chunked', dict(chunk_size=R))):
            for implementation in ('pallas_gpu', 'splash'):
                for causal in (False, True):
                    def loss(q, k, v, s, implementation=implementation):
                        o = attention.get(kind)(q, k, v, causal=causal, segment_ids=s,
                                                implementation=implementation, **settings)
                        return jnp.sum(o * cot)
                    reference = lambda q, k, v, s: loss(q, k, v, s, 'xla')
                    want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(
                        q, k, v, seg)
                    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                    with sharding.axis_rules(mesh):
                        got = grad(*args)
                        text = grad.lower(*args).compile().as_text()
                    error = max(float(jnp.max(jnp.abs(a - b)))
                                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
                    name = f'{kind} {implementation} causal={causal} {mesh_sizes}'
                    assert error < 2e-5 * max(1.0, abs(float(want[0]))), (name, error)
                    out[name] = dict(kind=kind, causal=causal, batch=2 // mesh.shape['data'],
                                     error=error, bytes=collectives.total_bytes(text),
                                     moved=collectives.summary(text))
    print('KERNEL HALO ' + json.dumps(out))
''')

DECODE = textwrap.dedent('''
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from longjax import decode, sharding
    from tests.decode import helpers

    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=4),
                              devices=jax.devices()[:4])

    def place(params):
        def put(var):
            spec = sharding.logical_to_spec(var.get_metadata()['logical_axes'], var.shape, mesh)
            return var.replace(jax.device_put(var[...], NamedSharding(mesh, spec)))
        return jax.tree.map(put, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    for kind in ('full', 'local', 'global_local'):
        graphdef, params = helpers.split(helpers.build(helpers.tiny(kind)))
        prompt, lengths = helpers.tokens(0, (4, 16)), np.array([16, 9, 5, 1])
        settings = decode.DecodeSettings(max_decode_len=10, beam_size=2, eos_id=None)
        alone = decode.generate(graphdef, params, prompt, lengths, settings=settings)
        spread = decode.generate(graphdef, place(params), prompt, lengths, settings=settings,
                                 mesh=mesh)
        np.testing.assert_array_equal(spread.tokens, alone.tokens)
    print('DECODE OK')
''')

MESHES = [{'sequence': 8}, {'data': 2, 'sequence': 4}, {'fsdp': 2, 'sequence': 2, 'tensor': 2}]


def _run(script, *args):
  result = train_testing.run_python(['-c', script, *args], env=train_testing.subprocess_env(8),
                                    timeout=1200)
  return result.stdout


@pytest.mark.slow
def test_every_kind_sequence_sharded_equals_one_device():
  stdout = _run(EQUALITY, json.dumps(MESHES))
  line, = [l for l in stdout.splitlines() if l.startswith('EQUAL ')]
  errors = json.loads(line[len('EQUAL '):])
  assert len(errors) == 10 * 2 * len(MESHES)


@pytest.mark.slow
def test_global_and_summary_kinds_move_nothing_of_the_sequence_length():
  """global_local exchanges only global tokens (n x 2 num_global rows) and
  transient_global its L / summary_block summary slots: no collective moves an
  axis as long as one shard (16384 / 8 tokens), forward or backward."""
  stdout = _run(SMALL_GATHERS)
  line, = [l for l in stdout.splitlines() if l.startswith('SMALL ')]
  measured = json.loads(line[len('SMALL '):])
  assert len(measured) == 3 * 2 * 2
  for name, found in measured.items():
    assert found['longest'] < 16384 // 8, (name, found)
    assert found['bytes'] < 4 * 2**20, (name, found)


@pytest.mark.slow
def test_hierarchical_levels_move_spans_not_rows():
  """Every coarse level moves a span or two of 2 x level0_block slots between
  neighbouring shards: forward and backward, packed or not, no collective
  carries an axis as long as one shard, and quadrupling the length (two more
  levels) adds little, where gathering anything of the row would quadruple it."""
  stdout = _run(HIERARCHY)
  line, = [l for l in stdout.splitlines() if l.startswith('HIERARCHY ')]
  measured = json.loads(line[len('HIERARCHY '):])
  assert len(measured) == 2 * 2 * 2
  for name, found in measured.items():
    assert found['longest'] < 16384 // 8, (name, found)
  for packed in (False, True):
    for causal in (False, True):
      short, long = (measured[f'{length} {packed} {causal}']['bytes'] for length in (16384, 65536))
      assert long < 1.4 * short, (packed, causal, short, long)


KINDS = ('full', 'local', 'chunked', 'global_local', 'transient_global', 'hierarchical',
         'multiresolution', 'adaptive_span')


@pytest.mark.slow
def test_twenty_training_steps_match_one_device(tmp_path):
  """Every kind trains 20 steps on sequence=8 and on fsdp=2 x sequence=2 x
  tensor=2 with one device's losses (to 1e-5 relative)."""
  def losses(*args, devices):
    result = train_testing.run_python(['-c', TRAINING, str(tmp_path), ','.join(KINDS), *args],
                                      env=train_testing.subprocess_env(devices), timeout=1800)
    line, = [l for l in result.stdout.splitlines() if l.startswith('LOSSES ')]
    return json.loads(line[len('LOSSES '):])

  alone = losses(devices=1)
  spread = losses(json.dumps([{'sequence': 8}, {'fsdp': 2, 'sequence': 2, 'tensor': 2}]),
                  devices=8)
  assert len(spread) == 2 * len(KINDS)
  for name, got in spread.items():
    want = alone[name.split(' ')[0]]
    assert len(got) == len(want) == 20, name
    for step, (a, b) in enumerate(zip(got, want)):
      assert abs(a - b) <= 1e-5 * abs(b), (name, step, a, b)


@pytest.mark.slow
def test_local_attention_moves_only_its_halo():
  stdout = _run(HALO)
  line, = [l for l in stdout.splitlines() if l.startswith('HALO ')]
  measured = json.loads(line[len('HALO '):])
  radius, kv_heads, head_dim = 128, 2, 64
  for key in [k for k in measured if k.startswith('work ')]:
    work, shards = measured.pop(key), int(key.split(' ')[1])
    if key.endswith('True'):  # zigzag: every shard the same causal work, half of a block's
      assert work == [4 + 2 * (shards - 1)] * shards, (key, work)
    else:  # contiguous: shard i scores i + 1 blocks
      assert work == [4 * (i + 1) for i in range(shards)], (key, work)
  for key in [k for k in measured if k.startswith('ring ')]:
    found = measured.pop(key)
    shards = int(key.split(' ')[1])
    assert 'all-gather' not in found['ops'], (key, found)
    assert found['longest'] <= 4096 // shards, (key, found)  # one shard's keys at a time
  for key, found in measured.items():
    shards, causal, mode = key.split(' ')
    directions = 1 if causal == 'True' else 2
    halo = 2 * radius * kv_heads * head_dim * 4 * directions  # K and V, f32
    if mode == 'fwd+bwd':
      halo *= 2  # the halo's gradients go back to their shard
    assert found['ops'] == ['collective-permute'], (key, found)  # no all-gather of K/V
    assert found['bytes'] <= 1.25 * halo, (key, found['bytes'], halo)


@pytest.mark.slow
def test_accelerator_kernels_exchange_halos_on_a_sequence_mesh():
  """splash and pallas_gpu (interpreted) on sequence shards: each shard takes the
  window's keys from its neighbours, and nothing of the sequence's length moves."""
  stdout = _run(KERNEL_HALO)
  line, = [l for l in stdout.splitlines() if l.startswith('KERNEL HALO ')]
  found = json.loads(line[len('KERNEL HALO '):])
  assert len(found) == 2 * 2 * 2 * 2
  radius, kv_heads, head_dim = 24, 2, 16  # KERNEL_HALO's
  for name, result in found.items():
    moved = result['moved']
    if result['kind'] == 'local':
      # K and V halos there and their gradients back: 2 x 2 x radius rows per direction.
      directions = 1 if result['causal'] else 2
      halo = 2 * 2 * radius * kv_heads * head_dim * 4 * result['batch'] * directions
      others = {op: e for op, e in moved.items() if op != 'collective-permute'}
      assert all(e['shapes'] == ['f32[]'] for e in others.values()), (name, moved)  # the loss
      assert result['bytes'] - 4 * len(others) <= 1.25 * halo, (name, result['bytes'], halo)
    else:
      # chunked: the same halo; where each document's chunks start is scanned per
      # shard, so only [shards, batch] totals are gathered, never a row.
      for shape in moved.get('all-gather', {}).get('shapes', []):
        assert shape.startswith('s32[') and '512' not in shape, (name, moved)


@pytest.mark.slow
def test_a_sequence_sharded_model_decodes_as_one_device():
  """Prefill runs sequence-sharded (the ring for full attention); the generated
  tokens are one device's."""
  assert 'DECODE OK' in _run(DECODE)


@pytest.mark.parametrize('seq_len,shards,ok', [(128, 4, True), (96, 4, False), (130, 2, False)])
def test_shards_must_hold_whole_tiles(seq_len, shards, ok):
  config = train_testing.tiny_config(seq_len=seq_len, model__max_len=256,
                                     model__attention__kind='local',
                                     model__attention__radius=16)
  mesh = dict(data=1, fsdp=1, tensor=1, sequence=shards)
  if ok:
    validation.validate_config(config, mesh_shape=mesh, process_count=1)
  else:
    with pytest.raises(validation.ConfigError, match='config.seq_len'):
      validation.validate_config(config, mesh_shape=mesh, process_count=1)
