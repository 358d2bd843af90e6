"""The `pretrain` job: one stage's pre-training (train/pretrain.py), then its statistics pass.

A report stage has no statistics: text is discrete and never inverted (its stage keeps a real k-means buffer
in a continual sequence instead).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from invcoss_jax.jobs import inversion as inversion_jobs
from invcoss_jax.privacy import accounting as privacy_accounting
from invcoss_jax.train import pretrain as pretrain_lib


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             stop_at_step: int | None = None) -> dict[str, Any]:
  """Pre-trains (or resumes) the stage in `workdir`, then (once finished, with config.train.stats_after_pretrain)
  writes its statistics. `stop_at_step` ends early with a checkpoint, as a preempted job would.

  Returns `train.pretrain.train_stage`'s dict plus stats (what the statistics pass returned, or None)."""
  out = pretrain_lib.train_stage(config, workdir, stop_at_step=stop_at_step)
  out["stats"] = None
  if out["step"] >= out["total_steps"] and bool(config.train.stats_after_pretrain):
    if out["text"]:
      logging.info("report stage: no feature statistics (text is not inverted)")
    else:
      out["stats"] = inversion_jobs.run_stats(out["config"], out["workdir"], params=out["state"].params)
      _record_statistics_not_private(out["workdir"])
  return out


def _record_statistics_not_private(workdir: str) -> None:
  """A DP stage's statistics pass is not differentially private yet (docs/privacy.md): its ledger says so."""
  record = privacy_accounting.read_ledger(workdir)
  if record is None:
    return
  record["statistics"] = dict(dp=False, note=(
      "the feature statistics (statistics.npz) were computed on the stage's data without noise: they, and "
      "synthetic sets inverted from them, are not covered by this ledger's epsilon"))
  privacy_accounting.write_ledger(workdir, record)
  logging.warning("%s: the statistics pass is not differentially private; synthetic sets inverted from it are "
                  "not covered by the stage's (epsilon, delta) (privacy.json)", workdir)
