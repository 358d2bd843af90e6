"""The `continual` job: the modality sequence of `config.continual` with one method of Table 1
(invcoss_jax/continual/sequence.py runs it; docs/continual.md)."""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from invcoss_jax.continual import sequence


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        stop_at: tuple[int, int] | None = None, after_stage: Callable | None = None) -> dict[str, Any]:
  """Runs (or resumes) the sequence in `workdir` (see `continual.sequence.run`)."""
  return sequence.run(config, workdir, stop_at=stop_at, after_stage=after_stage)
