"""AdamW with MAE's weight-decay exclusions, linear warm-up then cosine, optional accumulation.

Everything is read from `config.train`; the run length (in optimiser updates) comes from
`run_length`, so a capped run (`config.total_steps`) keeps the schedule's shape.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import ml_collections
import optax

from invcoss_jax.config_checks import ConfigError


@dataclasses.dataclass(frozen=True)
class RunLength:
  """Lengths in optimiser updates; one update consumes `grad_accum_steps` micro-batches.
  `steps_per_epoch` is 0 when neither it nor the data size is known (a run set by total_steps)."""
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int
  grad_accum_steps: int

  @property
  def total_micro_steps(self) -> int:
    return self.total_steps * self.grad_accum_steps


def peak_learning_rate(train_cfg: ml_collections.ConfigDict) -> float:
  """MAE's linear scaling rule: base_lr * global_batch_size / 256."""
  return float(train_cfg.base_lr) * int(train_cfg.global_batch_size) / 256.0


def run_length(config: ml_collections.ConfigDict, num_examples: int | None) -> RunLength:
  """Run length from `config.total_steps` (> 0) or `train.num_epochs` x the epoch length.

  The warm-up keeps its fraction of the run (warmup_epochs / num_epochs) when the run is capped.
  """
  t = config.train
  k = int(t.get("grad_accum_steps", 1))
  if k < 1:
    raise ConfigError(f"config.train.grad_accum_steps must be >= 1, got {k}")
  if int(t.global_batch_size) % k:
    raise ConfigError(f"config.train.global_batch_size={t.global_batch_size} must be divisible by "
                     f"config.train.grad_accum_steps={k}")
  steps_per_epoch = int(t.get("steps_per_epoch", -1))
  if steps_per_epoch <= 0 and num_examples is not None:
    steps_per_epoch = max(1, int(num_examples) // int(t.global_batch_size))
  if steps_per_epoch <= 0 and int(config.total_steps) <= 0:
    raise ConfigError("config.train.steps_per_epoch is -1, config.total_steps is -1 and the number of "
                     "examples is unknown: set one of them")
  num_epochs = float(t.num_epochs)
  if int(config.total_steps) > 0:
    total = int(config.total_steps)
    warmup = int(round(total * float(t.warmup_epochs) / num_epochs)) if num_epochs > 0 else 0
  else:
    total = int(round(num_epochs * steps_per_epoch))
    warmup = int(round(float(t.warmup_epochs) * steps_per_epoch))
  if total <= 0:
    raise ConfigError(f"the run has no steps: config.total_steps={config.total_steps}, "
                     f"config.train.num_epochs={t.num_epochs}, steps_per_epoch={steps_per_epoch}")
  return RunLength(total_steps=total, warmup_steps=min(warmup, total - 1) if total > 1 else 0,
                   steps_per_epoch=max(steps_per_epoch, 0), grad_accum_steps=k)


def make_schedule(train_cfg: ml_collections.ConfigDict, length: RunLength) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then half-cosine to `min_lr`, over optimiser updates."""
  peak = peak_learning_rate(train_cfg)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=length.warmup_steps,
      decay_steps=max(length.total_steps, length.warmup_steps + 1), end_value=float(train_cfg.min_lr))


def path_name(path: Sequence[Any]) -> str:
  """'encoder/block_0/attn/kernel' for a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def weight_decay_mask(params: Any, no_decay_patterns: Sequence[str] = ()) -> Any:
  """True where AdamW applies weight decay: rank >= 2 and no pattern matches the path."""
  regexes = [re.compile(p) for p in no_decay_patterns]

  def decays(path, x):
    if len(getattr(x, "shape", ())) <= 1:
      return False
    name = path_name(path)
    return not any(r.search(name) for r in regexes)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict,
                   length: RunLength) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ optional clipping) under the warm-up/cosine schedule; wrapped in optax.MultiSteps
  when `grad_accum_steps` > 1, so one call per micro-batch and one update every k calls."""
  schedule = make_schedule(train_cfg, length)
  patterns = tuple(train_cfg.get("no_decay_patterns", ()))
  adamw = optax.adamw(learning_rate=schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                      eps=float(train_cfg.get("eps", 1e-8)), weight_decay=float(train_cfg.weight_decay),
                      mask=lambda p: weight_decay_mask(p, patterns))
  clip = float(train_cfg.get("grad_clip_norm", 0.0))
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  if length.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=length.grad_accum_steps)
  return tx, schedule
