"""The `export_torch` job: a trained stage's encoder as timm-compatible safetensors files.

The stage is `config.init_from` (a workdir with `config.json` and `checkpoints/`), or `workdir` itself when
`config.init_from` is empty. The stage's own `config.json` describes the model. Files are written to
`workdir/<config.interop.export_dir>/encoder_{2d,3d}.safetensors` with a `.json` of the same name.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from invcoss_jax.interop import export
from invcoss_jax.interop.config import interop_config
from invcoss_jax.train import checkpoint as ckpt_lib


def _interop(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = interop_config()
  given = config.get("interop")
  if given is not None:
    unknown = sorted(set(given) - set(c))
    if unknown:
      raise ValueError(f"config.interop has unknown options {unknown}; expected {sorted(c)}")
    c.update(given)
  return c


def run_export(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, str]:
  """Exports the encoder of every requested dimension the stage has; returns {'2d': path, ...}."""
  workdir = os.fspath(workdir)
  icfg = _interop(config)
  source = str(config.init_from or "") or workdir
  stage_config, _, params = ckpt_lib.load_trained_stage(source)
  wanted = [str(d).lower() for d in icfg.export_dims]
  bad = [d for d in wanted if d not in ("2d", "3d")]
  if bad:
    raise ValueError(f"config.interop.export_dims has {bad}; expected '2d' and/or '3d'")
  ranks = [r for r in (2, 3) if f"{r}d" in wanted and f"patch_embed_{r}d" in params]
  if not ranks:
    have = sorted(k for k in params if k.startswith("patch_embed_"))
    raise ValueError(f"the stage in {source!r} has tokenizers {have}; none of config.interop.export_dims="
                     f"{tuple(wanted)} to export")
  out_dir = os.path.join(workdir, icfg.export_dir)
  written = {}
  for r in ranks:
    size = tuple(icfg.get(f"export_image_size_{r}d") or ()) or None
    path = os.path.join(out_dir, f"encoder_{r}d.safetensors")
    if jax.process_index() == 0:
      export.export_timm_encoder(params, stage_config.model, path, rank=r, image_size=size)
      logging.info("exported the %dD encoder of %s to %s", r, source, path)
    written[f"{r}d"] = path
  return written
