"""Flax MAE encoder -> timm `VisionTransformer` state dict (safetensors), loadable in PyTorch with one call.

    model = timm.models.vision_transformer.VisionTransformer(
        **meta["timm_kwargs"], norm_layer=partial(nn.LayerNorm, eps=meta["layer_norm_eps"]))
    model.load_state_dict(safetensors.torch.load_file("encoder_2d.safetensors"))

Keys: `cls_token`, `pos_embed` (1, 1 + N, D) with a zero CLS row, `patch_embed.proj.{weight,bias}`,
`blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `blocks.{i}.ls{1,2}.gamma` (LayerScale) and
`norm.*` (final norm). A 3D encoder is written with the same keys and a Conv3d `patch_embed.proj.weight`
(D, C, d, h, w), for ViTs that follow timm's naming with a 3D patch embedding (timm itself is 2D only).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax
import ml_collections
import numpy as np

from invcoss_jax import io_utils
from invcoss_jax.interop import checkpoint_io, positions, rules
from invcoss_jax.models.vit_mae import ViTConfig


def _vit_config(model_cfg: ml_collections.ConfigDict | ViTConfig) -> ViTConfig:
  return model_cfg if isinstance(model_cfg, ViTConfig) else ViTConfig.from_config(model_cfg)


def default_image_size(cfg: ViTConfig, rank: int) -> tuple[int, ...]:
  """The image size of the learned-table grid (224 x 224 for the 14 x 14 default)."""
  grid = cfg.learned_pos_grid_2d if rank == 2 else cfg.learned_pos_grid_3d
  return tuple(int(g) * int(p) for g, p in zip(grid, cfg.patch_size(rank)))


def timm_state_dict(params: Any, model_cfg: ml_collections.ConfigDict | ViTConfig, *, rank: int = 2,
                    image_size: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, metadata) of the encoder for `rank`-D inputs of `image_size` (default: `default_image_size`).

  The metadata holds `timm_kwargs` (VisionTransformer arguments), `layer_norm_eps` and `image_size`. The
  position table is the fixed sin-cos table of the export grid, or the learned table interpolated to it as the
  model does. A temporal table (MedCoSS) is folded into the patch-embedding bias with its eval-time row 0.
  """
  cfg = _vit_config(model_cfg)
  if cfg.embed_norm:
    raise ValueError("config.model.embed_norm=True (LayerNorm after the tokenizer, before the CLS token) has no "
                     "timm VisionTransformer equivalent: timm's norm_pre also normalises the CLS token")
  flat = {k: np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}
  if (f"patch_embed_{rank}d", "kernel") not in flat:
    raise ValueError(f"the parameters have no {rank}D tokenizer (patch_embed_{rank}d); they have "
                     f"{sorted({k[0] for k in flat if k[0].startswith('patch_embed')})}")
  patch = tuple(int(p) for p in cfg.patch_size(rank))
  image_size = tuple(int(s) for s in (image_size or default_image_size(cfg, rank)))
  if len(image_size) != rank or any(s % p for s, p in zip(image_size, patch)):
    raise ValueError(f"export image size {image_size} must have {rank} dims divisible by the patch {patch}")
  grid = tuple(s // p for s, p in zip(image_size, patch))
  if cfg.temporal_pos_len > 0:
    key = (f"patch_embed_{rank}d", "bias")
    flat[key] = flat[key] + flat[(f"temporal_pos_embed_{rank}d",)][0]

  rs = rules.conv_patch_embed("patch_embed.proj", (f"patch_embed_{rank}d",), patch, cfg.channels(rank))
  rs.append(positions.encoder_pos("cls_token", "pos_embed", rank, width=cfg.width,
                                  learned=cfg.pos_embed == "learned",
                                  base_grid=cfg.learned_pos_grid_2d if rank == 2 else cfg.learned_pos_grid_3d,
                                  grid=grid))
  for i in range(cfg.depth):
    rs += rules.timm_block(f"blocks.{i}", ("encoder", f"block_{i}"), cfg.num_heads, cfg.layer_scale_init > 0)
  if cfg.final_norm:
    rs += rules.layer_norm("norm", ("encoder", "norm"))
  state_dict = {}
  for rule in rs:
    state_dict.update(zip(rule.torch_keys, rule.to_torch([flat[p] for p in rule.flax_paths])))

  timm_kwargs = dict(img_size=list(image_size),
                     patch_size=patch[0] if len(set(patch)) == 1 else list(patch),
                     in_chans=cfg.channels(rank), embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
                     mlp_ratio=cfg.mlp_ratio, qkv_bias=True, class_token=True, global_pool="token", num_classes=0)
  if cfg.layer_scale_init > 0:
    timm_kwargs["init_values"] = cfg.layer_scale_init
  if not cfg.final_norm:
    timm_kwargs["final_norm"] = False  # recent timm; without that argument: model.norm = nn.Identity()
  meta = dict(timm_kwargs=timm_kwargs, layer_norm_eps=cfg.ln_eps, image_size=list(image_size),
              spatial_rank=rank, source="invcoss_jax")
  return state_dict, meta


def export_timm_encoder(params: Any, model_cfg: ml_collections.ConfigDict | ViTConfig,
                        path: str | os.PathLike, *, rank: int = 2,
                        image_size: Sequence[int] | None = None) -> dict[str, Any]:
  """Writes `path` (safetensors; metadata `format='pt'`, `timm_kwargs`, `layer_norm_eps`) and `path` with a
  `.json` suffix (the same metadata, readable without safetensors). Returns the metadata."""
  state_dict, meta = timm_state_dict(params, model_cfg, rank=rank, image_size=image_size)
  path = os.fspath(path)
  checkpoint_io.write_safetensors(path, state_dict, metadata=dict(format="pt", **meta))
  io_utils.atomic_write_json(os.path.splitext(path)[0] + ".json",
                             dict(meta, keys={k: list(v.shape) for k, v in state_dict.items()}))
  return meta


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of an exported safetensors file, JSON values decoded."""
  out = {}
  for k, v in checkpoint_io.read_safetensors_metadata(path).items():
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out
