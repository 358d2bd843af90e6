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


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       rng: jax.Array, mesh: Mesh, *, shard_params: bool = False,
                       fsdp_min_size: int = mesh_lib.DEFAULT_FSDP_MIN_SIZE,
                       params: Any | None = None) -> tuple[TrainState, Any]:
  """Builds the state directly in its sharded layout (jit with out_shardings), so no device ever
  holds more than its share; returns (state, state_shardings).

  `init_params(rng) -> params` creates float32 parameters; `params`, if given, replaces them
  (e.g. weights carried over from an earlier stage) and is resharded to the same layout.
  """
  init_rng, state_rng = jax.random.split(rng)

  def init(init_rng, state_rng, given):
    p = init_params(init_rng) if given is None else given
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=state_rng)

  abstract = jax.eval_shape(init, init_rng, state_rng, params)
  shardings = mesh_lib.param_shardings(mesh, abstract, shard_params, min_size=fsdp_min_size)
  state = jax.jit(init, out_shardings=shardings)(init_rng, state_rng, params)
  return state, shardings


def abstract_state(state_or_shape: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings, the target orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state_or_shape, shardings)
