"""The training state, a plain pytree, and its creation directly in its shards.

    graphdef, abstract_params = abstract_model(model_config)     # shapes only
    shardings = state_shardings(tx, abstract_params, mesh, rules)
    state = create_train_state(model_config, tx, shardings, seed=config.seed)

`params` is the model's Params as a plain nested dict of arrays
(`nnx.to_pure_dict`), so checkpoints hold arrays only and the step functions
rebuild the model with `nnx.merge(graphdef, params)`. Each parameter's layout
comes from its `logical_axes` metadata and the axis rules; the optimizer's
moments take the layout of their parameter, its counters are replicated.
Nothing is ever materialised whole on one device: `create_train_state` is
one jitted initialiser whose outputs are placed by `out_shardings`.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longjax import models
from longjax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far.
  params: Any  # nested dict of fp32 arrays, the model's Params.
  opt_state: Any  # optax state of `params`.


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def abstract_model(model_config: models.ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its Params as shapes with metadata; allocates nothing.

  Raises if the model holds state other than Params: the functional step
  functions would silently drop it.
  """
  model = nnx.eval_shape(lambda: models.build(model_config, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def param_specs(abstract_params: nnx.State, mesh: Mesh, rules) -> dict:
  """PartitionSpec of every parameter from its `logical_axes` and the rules."""
  def spec(variable):
    names = variable.get_metadata().get('logical_axes')
    if names is None or len(names) != variable.ndim:
      # Unnamed weights are replicated; so are LoRA adapters, which Qwix gives their
      # base weight's names (of another rank): they are small.
      return PartitionSpec()
    return sharding.logical_to_spec(names, variable.shape, mesh, rules)

  return nnx.to_pure_dict(jax.tree.map(spec, abstract_params, is_leaf=_is_variable))


def state_shardings(tx: optax.GradientTransformation, abstract_params: nnx.State, mesh: Mesh,
                    rules) -> TrainState:
  """NamedShardings of every leaf of the TrainState."""
  specs = param_specs(abstract_params, mesh, rules)
  opt_shapes = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
  # A frozen leaf's state (LoRA's optax.multi_transform) is an empty MaskedNode.
  opt_specs = optax.tree_map_params(
      tx, lambda leaf, spec: leaf if isinstance(leaf, optax.MaskedNode) else spec, opt_shapes,
      specs, transform_non_params=lambda _: PartitionSpec(),
      is_leaf=lambda x: isinstance(x, (PartitionSpec, optax.MaskedNode)))
  tree = TrainState(step=PartitionSpec(), params=specs, opt_state=opt_specs)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def _initializer(model_config: models.ModelConfig, tx: optax.GradientTransformation, seed: int):
  def init() -> TrainState:
    model = models.build(model_config, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def create_train_state(model_config: models.ModelConfig, tx: optax.GradientTransformation,
                       shardings: TrainState, *, seed: int) -> TrainState:
  """Fresh parameters (seeded by `seed`) and optimizer state, created in their shards.

  Random bits are partitionable (jax_threefry_partitionable, on by default),
  so the values do not depend on the mesh.
  """
  return jax.jit(_initializer(model_config, tx, seed), out_shardings=shardings)()


def abstract_train_state(model_config: models.ModelConfig, tx: optax.GradientTransformation,
                         shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings: what a restore fills in."""
  shapes = jax.eval_shape(_initializer(model_config, tx, seed=0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
