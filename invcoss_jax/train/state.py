"""The train state and its sharded creation."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from invcoss_jax.parallel import mesh as mesh_lib


class TrainState(flax.struct.PyTreeNode):
  """`step` counts train-step calls (micro-batches under gradient accumulation); `rng` is the
  run's base key, folded with `step` for each step's masking and drop-path streams."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def _state_init(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
  def init(rng, params):
    init_rng, state_rng = jax.random.split(rng)
    p = init_params(init_rng) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=state_rng)
  return init


def abstract_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                         rng: jax.Array, mesh: Mesh, *, shard_params: bool = False,
                         fsdp_min_size: int = mesh_lib.DEFAULT_FSDP_MIN_SIZE,
                         params: Any | None = None) -> tuple[TrainState, Any]:
  """(ShapeDtypeStructs carrying their shardings, the shardings) of the state, without computing
  it: the target a checkpoint is restored into."""
  shapes = jax.eval_shape(_state_init(init_params, tx), rng, params)
  shardings = mesh_lib.param_shardings(mesh, shapes, shard_params, min_size=fsdp_min_size)
  return abstract_state(shapes, shardings), shardings


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       rng: jax.Array, mesh: Mesh, *, shard_params: bool = False,
                       fsdp_min_size: int = mesh_lib.DEFAULT_FSDP_MIN_SIZE,
                       params: Any | None = None) -> tuple[TrainState, Any]:
  """Builds the state directly in its sharded layout (jit with out_shardings), so no device ever
  holds more than its share; returns (state, state_shardings).

  `init_params(rng) -> params` creates float32 parameters; `params`, if given, replaces them
  (e.g. weights carried over from an earlier stage) and is resharded to the same layout.
  """
  _, shardings = abstract_train_state(init_params, tx, rng, mesh, shard_params=shard_params,
                                      fsdp_min_size=fsdp_min_size, params=params)
  state = jax.jit(_state_init(init_params, tx), out_shardings=shardings)(rng, params)
  return state, shardings


def abstract_state(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings, the target orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
