"""The device mesh and the logical axis rules: the one place that knows both.

Models name the axes of every weight and key activation logically (`embed`,
`mlp`, `heads`, `batch`, `length`, ...). A table of rules maps each logical
name to mesh axes; the trainer builds the mesh from `config.mesh` and
activates the rules while tracing. Modules never name physical mesh axes.

Rules are an ordered list of (logical name, mesh axes). A name may appear
several times: the first entry whose mesh axes are still free in this array's
spec, and whose sizes divide the dimension, wins; otherwise the dimension is
replicated. So `batch` takes ('data', 'fsdp') on activations while `embed`,
which would also like 'fsdp', stays whole there but is sharded on weights.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')

# (logical name, mesh axes); see the module docstring for how they resolve.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ('batch', ('data', 'fsdp')),
    ('batch', 'data'),
    ('length', 'sequence'),
    ('kv_length', None),          # keys of cross-attention / decode caches
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('mlp', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),                  # per-head feature dimension
    ('vocab', 'tensor'),
    ('vocab', 'fsdp'),
    ('norm', None),
    ('layers', None),
)


def make_mesh(mesh_config, devices: Optional[Sequence] = None) -> Mesh:
  """Builds the (data, fsdp, tensor, sequence) mesh; -1 = all remaining devices.

  Raises ValueError (before anything compiles) when the sizes do not multiply
  to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f'config.mesh.{bad[0]} = {sizes[bad[0]]}: mesh sizes must be >= 1 or -1.')
  if len(free) > 1:
    raise ValueError(f'Only one mesh axis may be -1 ("the rest"); got config.mesh.'
                     f'{" and config.mesh.".join(free)} = -1.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(
          f'config.mesh: the fixed axes multiply to {fixed}, which does not divide the '
          f'{len(devices)} devices, so config.mesh.{free[0]} = -1 cannot fill the rest. '
          f'Mesh: {_describe(sizes)}.')
    sizes[free[0]] = len(devices) // fixed
  product = math.prod(sizes.values())
  if product != len(devices):
    raise ValueError(
        f'config.mesh: {_describe(sizes)} has {product} devices but there are '
        f'{len(devices)}; make the product equal the device count (set one axis to -1 '
        f'for "all remaining devices").')
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    # Topology-aware placement is a TPU nicety; any order is correct.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _describe(sizes) -> str:
  return ' x '.join(f'{a}={s}' for a, s in sizes.items())


def rules_from_config(extra_rules=()) -> tuple:
  """Config rules (tried first) followed by the defaults."""
  return tuple((str(name), axes if axes is None or isinstance(axes, str) else tuple(axes))
               for name, axes in extra_rules) + DEFAULT_RULES


def logical_to_spec(names: Sequence[Optional[str]], shape: Optional[Sequence[int]],
                    mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
  """Resolves logical axis names to a PartitionSpec on `mesh` (module docstring)."""
  used: set[str] = set()
  out = []
  for dim, name in enumerate(names):
    chosen = None
    for rule_name, axes in rules if name is not None else ():
      if rule_name != name:
        continue
      if axes is None:
        break
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if not axes:
        break  # a rule mapping to size-1 axes means "replicated here"
      if used & set(axes):
        continue
      if shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
        continue
      chosen = axes
      break
    if chosen:
      used.update(chosen)
      out.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      out.append(None)
  return PartitionSpec(*out)


class _Context(threading.local):
  mesh: Optional[Mesh] = None
  rules: tuple = DEFAULT_RULES


_context = _Context()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules=DEFAULT_RULES):
  """Activates `mesh` and `rules` for `constrain` while tracing model code."""
  old = (_context.mesh, _context.rules)
  _context.mesh, _context.rules = mesh, tuple(rules)
  try:
    yield
  finally:
    _context.mesh, _context.rules = old


def constrain(x, names: Sequence[Optional[str]]):
  """Constrains activation x to the layout its logical names resolve to.

  A no-op outside `axis_rules` (plain single-device use, tests, notebooks).
  """
  mesh = _context.mesh
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(names, x.shape, mesh, _context.rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def spec_for(names: Sequence[Optional[str]], shape) -> Optional[PartitionSpec]:
  """The PartitionSpec `names` resolve to under the active `axis_rules` (None outside)."""
  mesh = _context.mesh
  return None if mesh is None else logical_to_spec(names, shape, mesh, _context.rules)


def mesh_axis_size(axis: str) -> int:
  """Size of mesh axis `axis` under the active `axis_rules` (1 outside them)."""
  mesh = _context.mesh
  return 1 if mesh is None else int(mesh.shape[axis])


def per_shard(fn, args, names, outputs):
  """Runs fn on each device's shard of args (shard_map), laid out by logical names.

  For kernels with no partitioning rule (a pallas_call): under jit, GSPMD could
  only replicate their operands, gathering the batch onto every device. args: a
  tuple of arrays or None; names: each one's logical axis names (a name that
  resolves to no mesh axis, or a None arg, stays whole); outputs: (names,
  shape) of each output. Outside `axis_rules`, or on a one-device mesh, calls
  fn(*args).
  """
  mesh = _context.mesh
  if mesh is None or mesh.size == 1:
    return fn(*args)
  spec = lambda x, n: None if x is None else logical_to_spec(n, x.shape, mesh, _context.rules)
  in_specs = tuple(spec(x, n) for x, n in zip(args, names))
  out_specs = tuple(logical_to_spec(n, shape, mesh, _context.rules) for n, shape in outputs)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs if len(out_specs) > 1 else out_specs[0],
                       check_vma=False)(*args)
