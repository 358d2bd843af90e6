"""The `pretrain` job: one stage's pre-training (train/pretrain.py), then its statistics pass.

A report stage has no statistics: text is discrete and never inverted (its stage keeps a real k-means buffer
in a continual sequence instead).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from invcoss_jax.data import registry
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
      # With config.privacy on, the statistics are DP and composed into the stage's ledger (jobs/inversion.py).
      out["stats"] = inversion_jobs.run_stats(out["config"], out["workdir"], params=out["state"].params)
  return out


def check_config(config: ml_collections.ConfigDict) -> None:
  """A DP image stage whose statistics pass runs at the end has that pass's options (privacy.stats_clip_norm,
  the statistics' noise or share of the target); checked before training, not after it."""
  if (privacy_accounting.enabled(config.get("privacy")) and bool(config.train.stats_after_pretrain)
      and not registry.is_text(config.data)):
    privacy_accounting.check_statistics_options(config.privacy)
