"""PackNet's per-stage ownership masks (Mallya & Lazebnik 2018) on the encoder side of the MAE.

Every encoder-side weight has an owner: 0 while free, else the stage that claimed it. During stage t only free
weights of the parts the stage uses (its tokenizer and the shared trunk) are trained; weights of earlier
stages are frozen bit-exactly (their updates, weight decay included, are masked). At the end of stage t's
training, in each prunable leaf (kernels, rank >= 2) the largest-magnitude `1 - prune_fraction` of the free
weights become stage t's and the rest are released (set to 0) for later stages; small leaves (biases, norms,
CLS token, position tables) are claimed whole, as PackNet fixes biases and norms after the first task. A short
retraining then updates only the weights stage t kept. The last stage claims every free weight without
pruning. The decoder is re-initialised per stage and is always trainable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from invcoss_jax.continual.params import flatten, is_decoder_key, leaf_rank_suffix, unflatten

_SMALL_NAMES = ("cls_token", "pos_embed")


def is_prunable(path: str, leaf) -> bool:
  """Kernels of the encoder side (rank >= 2), not the CLS token nor position tables."""
  return np.ndim(leaf) >= 2 and not any(n in path for n in _SMALL_NAMES)


def used_by(path: str, ranks: set[int]) -> bool:
  """Whether a stage of spatial rank(s) `ranks` uses this encoder-side leaf (shared, or its tokenizer)."""
  r = leaf_rank_suffix(path)
  return r is None or r in ranks


def initial_owners(params: Any) -> dict:
  """int32 zeros (all free) shaped like every encoder-side leaf of `params`."""
  flat = {p: np.zeros(np.shape(v), np.int32) for p, v in flatten(params).items()
          if not is_decoder_key(p.split("/")[0])}
  return unflatten(flat)


def trainable_mask(params: Any, owners: Any, *, ranks: set[int], stage_index: int, retrain: bool) -> dict:
  """float32 0/1 multipliers of the updates, shaped like `params`.

  Training phase: free weights the stage uses; retraining: the weights the stage kept. Decoder: all."""
  own = flatten(owners)
  out = {}
  for path, leaf in flatten(params).items():
    if is_decoder_key(path.split("/")[0]):
      out[path] = np.ones(np.shape(leaf), np.float32)
      continue
    if path not in own:
      raise ValueError(f"PackNet: no owner mask for parameter {path}")
    if not used_by(path, ranks):
      out[path] = np.zeros(np.shape(leaf), np.float32)
      continue
    o = own[path]
    out[path] = ((o == stage_index) if retrain else (o == 0)).astype(np.float32)
  return unflatten(out)


def prune(params: Any, owners: Any, *, ranks: set[int], stage_index: int, prune_fraction: float,
          last_stage: bool) -> tuple[dict, dict, dict[str, float]]:
  """(pruned params, new owners, {'kept': ..., 'released': ...} weight counts) after stage `stage_index`.

  Deterministic and idempotent given `owners` from before the stage (released weights are 0 and so never
  outrank kept ones); ties in magnitude go to the lower flat index."""
  if not 0.0 <= prune_fraction < 1.0:
    raise ValueError(f"config.continual.packnet.prune_fraction must be in [0, 1), got {prune_fraction}")
  own = flatten(owners)
  new_params, new_owners = {}, {}
  kept = released = 0
  for path, leaf in flatten(params).items():
    w = np.array(leaf, copy=True)
    if is_decoder_key(path.split("/")[0]):
      new_params[path] = w
      continue
    o = np.array(own[path], copy=True)
    if used_by(path, ranks):
      free = o == 0
      if is_prunable(path, w) and not last_stage:
        idx = np.flatnonzero(free.ravel())
        keep = int(round((1.0 - prune_fraction) * idx.size))
        order = np.argsort(-np.abs(w.ravel()[idx]), kind="stable")
        keep_idx, drop_idx = idx[order[:keep]], idx[order[keep:]]
        o.ravel()[keep_idx] = stage_index
        w.ravel()[drop_idx] = 0
        kept += keep_idx.size
        released += drop_idx.size
      else:
        kept += int(free.sum())
        o[free] = stage_index
    new_params[path], new_owners[path] = w, o
  return unflatten(new_params), unflatten(new_owners), dict(kept=float(kept), released=float(released))
