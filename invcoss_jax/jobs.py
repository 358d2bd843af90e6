"""`config.mode` -> the job that runs it. Each job module is imported only when its mode runs."""

from __future__ import annotations

import importlib
import os
from typing import Any

import ml_collections

# mode -> (module, function); every function is called as fn(config, workdir).
JOBS: dict[str, tuple[str, str]] = {
    "pretrain": ("invcoss_jax.train.pretrain", "pretrain"),
    "stats": ("invcoss_jax.inversion.job", "run_stats"),
    "invert": ("invcoss_jax.inversion.job", "run_invert"),
    "continual": ("invcoss_jax.continual.job", "run"),
    "evaluate": ("invcoss_jax.evaluate.job", "run_evaluate"),
    "forgetting": ("invcoss_jax.evaluate.job", "run_forgetting"),
    "audit": ("invcoss_jax.audit.job", "run"),
    "retention": ("invcoss_jax.retention.job", "run"),
    "compile": ("invcoss_jax.train.compile_job", "run"),
    "export_torch": ("invcoss_jax.interop.job", "run_export"),
}


def job_for_mode(mode: str):
  if mode not in JOBS:
    raise ValueError(f"config.mode={mode!r} is unknown; expected one of {sorted(JOBS)}")
  module_name, fn_name = JOBS[mode]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise NotImplementedError(f"config.mode={mode!r} needs {module_name}, which is not in this "
                              f"installation") from e
  return getattr(module, fn_name)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
  """Runs the job `config.mode` selects in `workdir`; returns what the job returns."""
  from invcoss_jax import config_checks  # pylint: disable=g-import-not-at-top
  from invcoss_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  mode = str(config.get("mode", "pretrain"))
  fn = job_for_mode(mode)
  config_checks.check_options(config)
  workdir_lib.claim(workdir, config)
  return fn(config, os.fspath(workdir))
