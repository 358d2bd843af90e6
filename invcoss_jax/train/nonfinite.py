"""A non-finite training loss stops the run, naming its first step, before any checkpoint can keep it."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def check_losses(pending: Sequence[tuple[int, Any]], *, what: str, latest_checkpoint: int | None,
                 hint: str = "Lower train.base_lr or check the data (data.nonfinite)") -> None:
  """Raises FloatingPointError if a loss of `pending` ((step, metrics with 'loss'), in step order) is NaN or
  infinite. Called before every checkpoint save, so the last checkpoint on disk is always a finite state."""
  losses = jax.device_get([m["loss"] for _, m in pending])
  bad = [s for (s, _), l in zip(pending, losses) if not np.isfinite(float(l))]
  if bad:
    kept = (f"the last checkpoint (step {latest_checkpoint}) is kept and a restart resumes from it"
            if latest_checkpoint is not None else "no checkpoint was written")
    raise FloatingPointError(f"{what}: non-finite training loss at step {bad[0]}; {kept}. {hint}")
