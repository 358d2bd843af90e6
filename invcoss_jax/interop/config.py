"""Defaults of `config.interop`: the layout of `config.init_from_torch` and the `export_torch` job."""

from __future__ import annotations

import ml_collections


def interop_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.torch_layout = "auto"  # layout of config.init_from_torch: 'auto' | 'mae' | 'timm' | 'medcoss'
  c.export_dir = "export_torch"  # export_torch writes workdir/<export_dir>/encoder_{2d,3d}.{safetensors,json}
  c.export_dims = ("2d", "3d")  # dimensions to export (those the trained parameters have)
  c.export_image_size_2d = ()  # () = learned_pos_grid_2d * patch_size_2d (224 x 224 by default)
  c.export_image_size_3d = ()  # () = learned_pos_grid_3d * patch_size_3d (16 x 192 x 192 by default)
  return c
