"""The audit's model measurement as a registered evaluator (measure.evaluators): `membership`, the loss-threshold
membership-inference attack of a trained stage (members: its training images, whose losses the audit's streamed
pass computed; non-members: held-out images). The judges of the audit are retention's `judges` evaluator."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from invcoss_jax.audit import membership
from invcoss_jax.measure import features
from invcoss_jax.measure.evaluators import Evaluator, register_evaluator


@register_evaluator("membership")
class MembershipInference(Evaluator):
  """Per-image masked-reconstruction losses of the held-out images (`loss_fn(params, images, keys)`, one key
  per image, in fixed-size padded batches) against `member_losses`: bootstrap AUC of the attack, TPR at the
  given FPRs and the mean losses. `heldout_losses` holds the held-out losses after `run`."""

  def __init__(self, loss_fn: Callable, heldout_images: np.ndarray, heldout_keys: np.ndarray,
               member_losses: np.ndarray, *, batch_size: int, num_bootstrap: int, ci_level: float, seed: int,
               tpr_at_fpr: Sequence[float], mask_ratio: float, num_masks: int):
    self.loss_fn, self.images, self.keys, self.member_losses = loss_fn, heldout_images, heldout_keys, member_losses
    self.batch_size, self.num_bootstrap, self.ci_level, self.seed = batch_size, num_bootstrap, ci_level, seed
    self.fprs, self.mask_ratio, self.num_masks = tuple(tpr_at_fpr), mask_ratio, num_masks
    self.heldout_losses: np.ndarray | None = None

  def run(self, params: Any) -> dict[str, Any]:
    heldout_losses = features.batched(self.loss_fn, params, self.images, self.batch_size, self.keys
                                      ).astype(np.float64)
    member_losses = self.member_losses
    member_scores, nonmember_scores = -member_losses, -heldout_losses
    mia = membership.bootstrap_auc(member_scores, nonmember_scores, num_bootstrap=self.num_bootstrap,
                                   level=self.ci_level, seed=self.seed)
    mia.update(tpr_at_fpr={f"{f:g}": membership.tpr_at_fpr(member_scores, nonmember_scores, float(f))
                           for f in self.fprs},
               mean_loss_members=float(member_losses.mean()), mean_loss_nonmembers=float(heldout_losses.mean()),
               mask_ratio=self.mask_ratio, num_masks=self.num_masks)
    self.heldout_losses = heldout_losses
    return mia
