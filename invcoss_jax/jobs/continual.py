"""The `continual` job: the modality sequence of `config.continual` with one method of Table 1
(invcoss_jax/continual/sequence.py runs it; docs/continual.md)."""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from invcoss_jax import workdir as workdir_lib
from invcoss_jax.continual import guard, methods, sequence, stages


def check_config(config: ml_collections.ConfigDict) -> None:
  """The sequence's options (method, order, stage steps) and config.init_from, before anything is written."""
  method = stages.check_sequence(config)
  guard.check_privacy(config, methods.get(method))
  if str(config.get("init_from", "") or ""):
    workdir_lib.check_stage_workdir(str(config.init_from))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        stop_at: tuple[int, int] | None = None, after_stage: Callable | None = None) -> dict[str, Any]:
  """Runs (or resumes) the sequence in `workdir` (see `continual.sequence.run`)."""
  return sequence.run(config, workdir, stop_at=stop_at, after_stage=after_stage)
