"""The jobs: `config.mode` -> the job that runs it, one thin module per job in this folder (each reads its
config, calls the library and writes outputs; no library folder imports a job). A job module is imported only
when its mode runs.

`run` checks before it records: the options every job shares (`config_checks.check_options`), then the job's
own (`check_config(config)` of its module, where it has one: methods, orders, stage steps, seeds, init_from),
then the workdir (another run's: refused); only then does it lock the workdir (`workdir_lock`, held until the
job returns) and record the run in `workdir.json`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import ml_collections

from invcoss_jax import config_checks, workdir as workdir_lib, workdir_lock
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.inversion.config import inversion_spec
from invcoss_jax.privacy import accounting as privacy_accounting, config as privacy_config

# mode -> (module, function); every function is called as fn(config, workdir).
JOBS: dict[str, tuple[str, str]] = {
    "pretrain": ("invcoss_jax.jobs.pretrain", "pretrain"),
    "stats": ("invcoss_jax.jobs.inversion", "run_stats"),
    "invert": ("invcoss_jax.jobs.inversion", "run_invert"),
    "continual": ("invcoss_jax.jobs.continual", "run"),
    "evaluate": ("invcoss_jax.jobs.evaluate", "run_evaluate"),
    "forgetting": ("invcoss_jax.jobs.evaluate", "run_forgetting"),
    "audit": ("invcoss_jax.jobs.audit", "run"),
    "retention": ("invcoss_jax.jobs.retention", "run"),
    "compile": ("invcoss_jax.jobs.compile", "run"),
    "export_torch": ("invcoss_jax.jobs.export_torch", "run_export"),
}


def job_for_mode(mode: str):
  if mode not in JOBS:
    raise ConfigError(f"config.mode={mode!r} is unknown; expected one of {sorted(JOBS)}")
  module_name, fn_name = JOBS[mode]
  return getattr(importlib.import_module(module_name), fn_name)


def check_job_options(config: ml_collections.ConfigDict) -> None:
  """Every option of the job `config.mode` selects, checked without writing anything (ConfigError)."""
  mode = str(config.get("mode", "pretrain"))
  job_for_mode(mode)
  config_checks.check_options(config)
  if "inversion" in config:
    spec = inversion_spec(config.inversion)  # every key on one side of the spec, or a declared loss term's option
    if spec.host.pixel_components < 0 or spec.program.pixel_components_grid < 1:
      raise ConfigError(f"config.inversion.pixel_components={spec.host.pixel_components} / pixel_components_grid="
                        f"{spec.program.pixel_components_grid}: expected K >= 0 components on a grid of >= 1 pixel")
    if (spec.host.pixel_statistics and spec.host.pixel_components and "privacy" in config
        and privacy_config.enabled(config.privacy)):
      raise ConfigError("config.inversion.pixel_components > 0 keeps the covariance of the images, which the DP "
                        "statistics pass does not privatise: set it to 0 with config.privacy on")
  if "privacy" in config:  # every job: its values in range, DP on or off
    privacy_accounting.check_privacy(config.privacy, grad_accum_steps=int(config.get("train", {}).get(
        "grad_accum_steps", 1)))
  check = getattr(importlib.import_module(JOBS[mode][0]), "check_config", None)
  if check is not None:
    check(config)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
  """Runs the job `config.mode` selects in `workdir`; returns what the job returns."""
  fn = job_for_mode(str(config.get("mode", "pretrain")))
  check_job_options(config)
  workdir_lib.check(workdir, config)  # another run's workdir: refused before the lock creates anything
  with workdir_lock.hold(workdir):
    workdir_lib.claim(workdir, config)
    return fn(config, os.fspath(workdir))
