"""ewc: online EWC on the encoder side (Kirkpatrick et al. 2017). A stage keeps its anchor parameters and the
(online) empirical Fisher information of its task loss (`ewc.npz`; the MLM loss for a report stage); later
stages add `ewc.weight` x 1/2 sum F (theta - theta*)^2 to their loss. Nothing is replayed."""

from __future__ import annotations

import os

import jax
from absl import logging

from invcoss_jax.continual import ewc as ewc_lib
from invcoss_jax.continual import methods
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.stages import EWC_FILE, stage_key
from invcoss_jax.train import mlm


class EWC(methods.Method):
  keeps = "a penalty (anchor and Fisher information)"

  def loss_weights(self, c):
    return dict(ewc_weight=float(c.ewc.weight))

  def consts(self, config, stage, plan, spec):
    if spec.ewc_weight <= 0:
      return {}
    saved = params_lib.load_tree_npz(os.path.join(plan.prev.workdir, EWC_FILE))
    return dict(ewc_anchor=saved["anchor"], ewc_fisher=saved["fisher"])

  def end_stage(self, end):
    if end.last or os.path.isfile(os.path.join(end.stage.workdir, EWC_FILE)):
      return
    cfg, c, d = end.cfg, end.cfg.continual, end.stage.data[0]
    host = jax.device_get(end.params)
    enc, _ = params_lib.split_params(host)
    masker = mlm.masker_for(str(d.text.tokenizer), float(cfg.train.mlm_probability)) if end.text else None
    fisher, used = ewc_lib.empirical_fisher(end.model, host, end.eval_batches(int(c.ewc.fisher_batch_size)),
                                            mask_ratio=float(cfg.train.mask_ratio),
                                            rng=stage_key(cfg, end.stage.index, 3),
                                            num_examples=int(c.ewc.fisher_num_examples),
                                            batch_size=int(c.ewc.fisher_batch_size), masker=masker)
    previous = (params_lib.load_tree_npz(os.path.join(end.prev.workdir, EWC_FILE))["fisher"] if end.prev
                else None)
    fisher = ewc_lib.online_update(previous, fisher, float(c.ewc.gamma))
    params_lib.save_tree_npz(os.path.join(end.stage.workdir, EWC_FILE), anchor=enc, fisher=fisher)
    logging.info("%s: EWC Fisher information from %d examples", end.stage.name, used)

  def retains(self, c, text):
    return ("ewc",)


methods.register(EWC("ewc"))
