"""The `stats` and `invert` jobs: a trained stage read from disk, then the inversion library
(invcoss_jax/inversion/stage.py, where the files they write are described).

stats:  `workdir` holds the trained stage (config.data: the data the statistics are taken over).
invert: `config.init_from` = a trained stage's workdir (its checkpoint and statistics.npz) -> the synthetic set
        in `workdir`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from invcoss_jax import models, workdir as workdir_lib
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.inversion import stage as inv_stage, statistics
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.train.checkpoint import load_trained_stage
from invcoss_jax.train.writers import create_writer


def check_config(config: ml_collections.ConfigDict) -> None:
  """`invert` names a trained stage in config.init_from; checked before anything is written."""
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
  otherwise `params` belong to `build_mae(config.model)` (the `pretrain` job passes its final parameters)."""
  if params is None:
    _, model, params = load_trained_stage(workdir)
  else:
    model = models.build_mae(config.model)
  return inv_stage.write_statistics(model, params, config.data, config.inversion, workdir,
                                    mesh_lib.make_mesh(config.mesh))


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
