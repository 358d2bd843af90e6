"""PyTorch state dict -> Flax MAE parameters, with every disagreement reported at once.

`load_torch_into_params(path, params, model_cfg, layout)` is what `config.init_from_torch` runs: it returns a
new parameter tree in which every part the checkpoint provides is replaced (float32 NumPy arrays) and every
other leaf is the given one. A load that would be partial in an unplanned way fails with a
`CheckpointMismatchError` listing missing keys, unexpected keys, shape mismatches, model parameters the
checkpoint cannot fill, and the config settings that disagree with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax
import ml_collections
import numpy as np
from absl import logging

from invcoss_jax.interop import checkpoint_io, layouts
from invcoss_jax.interop.rules import Path
from invcoss_jax.models.vit_mae import ViTConfig

_MAX_LISTED = 25


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model; the message lists every problem."""


@dataclasses.dataclass
class ConversionReport:
  layout: str
  loaded: list[str]  # parameter paths replaced from the checkpoint ('encoder/block_0/attn/query/kernel', ...)
  kept: list[str]  # top-level parameters left as they were (e.g. a 3D tokenizer, a decoder)
  ignored: dict[str, str]  # checkpoint key -> why it was not loaded

  def summary(self) -> str:
    lines = [f"loaded {len(self.loaded)} parameters ({self.layout} layout)"]
    if self.kept:
      lines.append(f"kept as they were: {', '.join(self.kept)}")
    reasons: dict[str, int] = {}
    for why in self.ignored.values():
      reasons[why] = reasons.get(why, 0) + 1
    lines += [f"left out {n} checkpoint tensors: {why}" for why, n in reasons.items()]
    return "; ".join(lines)


def _vit_config(model_cfg: ml_collections.ConfigDict | ViTConfig) -> ViTConfig:
  return model_cfg if isinstance(model_cfg, ViTConfig) else ViTConfig.from_config(model_cfg)


def _name(path: Path) -> str:
  return "/".join(path)


def _listing(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  out = [f"  {title} ({len(items)}):"] + [f"    {s}" for s in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    out.append(f"    ... and {len(items) - _MAX_LISTED} more")
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], params: Any,
                       model_cfg: ml_collections.ConfigDict | ViTConfig, layout: str = "auto", *,
                       source: str = "the state dict") -> tuple[dict, ConversionReport]:
  """(new params, report): `params` with every part `state_dict` provides replaced. See module docstring."""
  cfg = _vit_config(model_cfg)
  params = flax.core.unfreeze(params)
  if not isinstance(params, Mapping) or "encoder" not in params or "cls_token" not in params:
    raise ValueError("params must be the MAE parameter tree (with 'encoder', 'cls_token', ...), e.g. from "
                     f"init_mae_params; got top-level keys {sorted(params) if isinstance(params, Mapping) else params}")
  layout = layouts.detect_layout(state_dict) if layout == "auto" else layout
  flat = flax.traverse_util.flatten_dict(params)
  plan = layouts.plan(layout, state_dict, cfg, set(flat))

  missing, mismatched, errors, used, new = [], [], [], set(), {}
  for rule in plan.rules:
    absent = [k for k in rule.torch_keys if k not in state_dict]
    if absent:
      missing += [f"{k} -> {', '.join(_name(p) for p in rule.flax_paths) or '(checked only)'}" for k in absent]
      continue
    no_param = [p for p in rule.flax_paths if p not in flat]
    if no_param:  # a rule of the plan always targets an existing parameter unless the config and tree disagree
      errors += [f"{_name(p)}: not in the parameter tree (was it built from this config.model?)" for p in no_param]
      continue
    current = [np.asarray(flat[p], np.float32) for p in rule.flax_paths]
    expected = rule.to_torch(current)
    bad = [(k, tuple(state_dict[k].shape), rule.expect or tuple(e.shape))
           for k, e in zip(rule.torch_keys, expected) if not rule.compatible(state_dict[k].shape, e.shape)]
    used.update(rule.torch_keys)
    if bad:
      mismatched += [f"{k}: checkpoint {ck}, model expects {ex}" for k, ck, ex in bad]
      continue
    try:
      values = rule.to_flax([np.asarray(state_dict[k], np.float32) for k in rule.torch_keys])
    except ValueError as e:
      errors.append(str(e))
      continue
    for p, v, c in zip(rule.flax_paths, values, current):
      if v.shape != c.shape:  # cannot happen when to_torch/to_flax agree; guards the rule tables
        raise AssertionError(f"rule for {rule.torch_keys} gives {_name(p)} shape {v.shape}, expected {c.shape}")
      new[p] = np.ascontiguousarray(v, np.float32)

  unexpected = sorted(k for k in state_dict if k not in used and k not in plan.ignored)
  filled = [p for p in flat if any(p[:len(pre)] == pre for pre in plan.filled)]
  covered = {p for r in plan.rules for p in r.flax_paths}
  unfilled = [_name(p) for p in filled if p not in covered]

  if missing or unexpected or mismatched or errors or unfilled:
    lines = [f"cannot load {source} ({layout} layout) into the model:"]
    lines += _listing("missing keys: the model needs them", missing)
    lines += _listing("unexpected keys: no place in the model", unexpected)
    lines += _listing("shape mismatches", mismatched)
    lines += _listing("model parameters the checkpoint cannot fill", unfilled)
    lines += _listing("conversion errors", errors)
    lines += _listing("config.model settings that disagree with the checkpoint", plan.hints)
    raise CheckpointMismatchError("\n".join(lines))

  flat.update(new)
  loaded_top = {p[0] for p in new}
  report = ConversionReport(layout=layout, loaded=sorted(_name(p) for p in new),
                            kept=sorted({p[0] for p in flat} - loaded_top), ignored=dict(plan.ignored))
  return flax.traverse_util.unflatten_dict(flat), report


def load_torch_into_params(path: str | os.PathLike, params: Any,
                           model_cfg: ml_collections.ConfigDict | ViTConfig, layout: str = "auto") -> dict:
  """`params` with the weights of the PyTorch checkpoint at `path` (MAE, timm or MedCoSS layout; `.safetensors`
  without PyTorch, `.pth` with it). Raises `CheckpointMismatchError` listing every disagreement."""
  if layout != "auto" and layout not in layouts.LAYOUTS:
    raise ValueError(f"layout {layout!r} is unknown; expected 'auto' or one of {layouts.LAYOUTS}")
  state_dict = checkpoint_io.read_state_dict(path)
  new_params, report = convert_state_dict(state_dict, params, model_cfg, layout, source=os.fspath(path))
  logging.info("init_from_torch %s: %s", os.fspath(path), report.summary())
  return new_params
