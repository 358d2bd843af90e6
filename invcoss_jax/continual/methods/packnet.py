"""packnet: per-stage ownership masks (Mallya & Lazebnik 2018, continual/packnet.py). During a stage only the
free weights of the parts it uses train; after `1 - packnet.retrain_fraction` of its steps the largest free
weights of each kernel become the stage's, the rest are zeroed and released (`packnet.npz`: the owner of
every encoder-side weight), and `retrain_fraction` more steps retrain only the kept weights. Earlier stages'
weights stay bit-exact. Nothing is replayed."""

from __future__ import annotations

import os

import jax
from absl import logging

from invcoss_jax.continual import methods
from invcoss_jax.continual import packnet as packnet_lib
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.stages import PACKNET_FILE


def _ranks(plan) -> set[int]:
  return {len(s) - 1 for s in plan.shapes}


def owners_before(stage, plan):
  """The owner of every encoder-side weight before this stage (stage T-1's packnet.npz, or all free)."""
  if plan.prev is not None:
    return params_lib.load_tree_npz(os.path.join(plan.prev.workdir, PACKNET_FILE))["owners"]
  return packnet_lib.initial_owners(plan.params)


class PackNet(methods.Method):
  keeps = "a mask (the owner of every encoder-side weight)"

  def extra_steps(self, c, steps):
    return int(round(float(c.packnet.retrain_fraction) * steps))

  def consts(self, config, stage, plan, spec):
    return dict(trainable=packnet_lib.trainable_mask(plan.params, owners_before(stage, plan), ranks=_ranks(plan),
                                                     stage_index=stage.index, retrain=False))

  def enter_extra_steps(self, config, stage, plan, shardings, consts_shardings, last):
    """PackNet's boundary: prune (idempotent) and train only the kept weights afterwards."""
    owners = owners_before(stage, plan)

    def enter(state, consts):
      pruned, new_owners, counts = packnet_lib.prune(
          jax.device_get(state.params), owners, ranks=_ranks(plan), stage_index=stage.index,
          prune_fraction=float(config.continual.packnet.prune_fraction), last_stage=last)
      params_lib.save_tree_npz(os.path.join(stage.workdir, PACKNET_FILE), owners=new_owners)
      logging.info("%s: PackNet kept %d weights, released %d", stage.name, counts["kept"], counts["released"])
      state = state.replace(params=jax.device_put(pruned, shardings.params))
      mask = packnet_lib.trainable_mask(pruned, new_owners, ranks=_ranks(plan), stage_index=stage.index,
                                        retrain=True)
      return state, dict(consts, trainable=jax.device_put(mask, consts_shardings["trainable"]))

    return enter

  def retains(self, c, text):
    return ("packnet",)


methods.register(PackNet("packnet"))
