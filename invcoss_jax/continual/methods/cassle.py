"""cassle: predictor-based distillation on the current stage's data (Fini et al. 2022), the LwF-style method
of Table 1: a predictor g (Linear-LayerNorm-ReLU-Linear, `continual.step.DistillPredictor`) maps the student's
tokens to the frozen previous model's under the same mask. Nothing is kept or replayed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from invcoss_jax.continual import methods
from invcoss_jax.continual.stages import stage_key
from invcoss_jax.continual.step import DistillPredictor


class CaSSLe(methods.Method):
  keeps = "nothing (distils the previous model on current data)"
  teacher = True

  def loss_weights(self, c):
    return dict(cassle_weight=float(c.cassle.weight))

  def aux(self, config, stage, plan, spec):
    """A new predictor at every stage (in the state's `aux`, so `params` stays the MAE tree)."""
    if spec.cassle_weight <= 0:
      return None, {}
    predictor = DistillPredictor(hidden_dim=int(config.continual.cassle.hidden_dim))
    params = jax.jit(predictor.init)(stage_key(config, stage.index, 2), jnp.zeros((1, 1, plan.model.cfg.width)))
    return predictor, {"predictor": params["params"]}


methods.register(CaSSLe("cassle"))
