"""The `stats` and `invert` jobs: a trained stage read from disk, then the inversion library
(invcoss_jax/inversion/stage.py, where the files they write are described).

stats:  `workdir` holds the trained stage (config.data: the data the statistics are taken over). With
        config.privacy on, the statistics are DP, composed into the stage's ledger (privacy.json, written by its
        DP-SGD; a stage without one is refused); off, on a DP stage, the ledger says they are not covered.
invert: `config.init_from` = a trained stage's workdir (its checkpoint and statistics.npz) -> the synthetic set
        in `workdir`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from invcoss_jax import data as data_lib, io_utils, models, workdir as workdir_lib
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.inversion import stage as inv_stage, statistics
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.privacy import accounting as privacy_accounting, config as privacy_config
from invcoss_jax.train.checkpoint import load_trained_stage
from invcoss_jax.train.writers import create_writer


def check_config(config: ml_collections.ConfigDict) -> None:
  """`invert` names a trained stage in config.init_from; `stats` with config.privacy on has the options of a
  DP statistics pass; checked before anything is written."""
  if str(config.get("mode", "")) == "stats" and privacy_config.enabled(config.get("privacy")):
    privacy_accounting.check_statistics_options(config.privacy)
  if str(config.get("mode", "")) != "invert":
    return
  if not str(config.init_from or ""):
    raise ConfigError("config.init_from must name the workdir of a trained stage (its checkpoint and "
                      "statistics.npz) for config.mode='invert'")
  workdir_lib.check_stage_workdir(str(config.init_from))


def run_stats(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, params=None
              ) -> statistics.FeatureStats:
  """Statistics pass of the stage in `workdir` over `config.data` (its whole `split`).

  With `params` None the stage's latest checkpoint is loaded (its model config from `workdir/config.json`);
  otherwise `params` belong to `build_mae(config.model)` (the `pretrain` job passes its final parameters).

  config.privacy on: DP statistics (docs/privacy.md), planned against the stage's ledger before anything is
  computed (the noise multiplier given, or calibrated so that the stage's DP-SGD and the statistics meet
  privacy.target_epsilon), their noise key from config.seed; the ledger then records both mechanisms and their
  composed epsilon. Off on a stage trained with DP-SGD: the ledger records that the statistics are not DP."""
  workdir = os.fspath(workdir)
  ledger = privacy_accounting.read_ledger(workdir)
  plan, data = None, str(config.data.get("name") or config.data.get("path"))
  if privacy_config.enabled(config.get("privacy")):
    plan = privacy_accounting.plan_dp_statistics(config.privacy, ledger, dataset_size=data_lib.num_examples(
        config.data), data=data, where=f"the stage in {workdir}")
    logging.info("DP statistics: noise multiplier %.4g (%s), clip norm %g: statistics alone (%.4g, %.3g)-DP, the "
                 "stage with its DP-SGD (%.4g, %.3g)-DP (%s accountant)", plan.noise_multiplier,
                 "calibrated" if plan.calibrated else "given", plan.clip_norm, plan.statistics_epsilon, plan.delta,
                 plan.epsilon, plan.delta, plan.accountant)
  if params is None:
    _, model, params = load_trained_stage(workdir)
  else:
    model = models.build_mae(config.model)
  stats = inv_stage.write_statistics(model, params, config.data, config.inversion, workdir,
                                     mesh_lib.make_mesh(config.mesh), dp=plan, seed=int(config.seed))
  if ledger is not None and jax.process_index() == 0:
    file = inv_stage.statistics_path(workdir, config.inversion)
    detail = dict(file=os.path.basename(file))
    if plan is not None:
      summary = io_utils.read_json(os.path.join(workdir, inv_stage.STATS_SUMMARY_FILE), ValueError)["privacy"]
      detail.update(variance_floor=summary["variance_floor"], floored_fraction=summary["floored_fraction"],
                    dimension=summary["dimension"])
    else:
      logging.warning("%s: the statistics pass is not differentially private (config.privacy is off); synthetic "
                      "sets inverted from it are not covered by the stage's (epsilon, delta) (privacy.json)", workdir)
    privacy_accounting.write_ledger(workdir, privacy_accounting.record_statistics(ledger, plan, data=data, **detail))
  return stats


def run_invert(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Inverts the stage in `config.init_from` into `workdir`; returns the summary."""
  stage_dir = str(config.init_from or "")
  if not stage_dir:
    raise ValueError("config.init_from must name the workdir of a trained stage (its checkpoint and "
                     "statistics.npz) for config.mode='invert'")
  stage_cfg, model, params = load_trained_stage(stage_dir)
  stats_file = inv_stage.statistics_path(stage_dir, config.inversion)
  stats = statistics.load_statistics(stats_file)
  os.makedirs(workdir, exist_ok=True)
  writer = create_writer(workdir)
  try:
    return inv_stage.invert_stage(model, params, stats, config.inversion, stage_data=stage_cfg.data,
                                  buffer_fraction=float(config.continual.buffer_fraction), seed=int(config.seed), workdir=workdir, mesh=mesh_lib.make_mesh(config.mesh),
                                  mesh_cfg=config.mesh, writer=writer, stage_dir=stage_dir, stats_file=stats_file)
  finally:
    writer.flush()
    writer.close()
