"""Analytic FLOPs of the ViT-MAE (matmuls only, 2 per multiply-add): the reference that the compile job's XLA
counts and the benchmarks' MFU are checked against."""

from __future__ import annotations

import math
from typing import Sequence

import ml_collections

from invcoss_jax.models.patching import grid_shape
from invcoss_jax.models.vit_mae import ViTConfig


def vit_mae_forward_flops(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int],
                          mask_ratio: float) -> int:
  """Matmul FLOPs (2 per multiply-add) of one MAE forward pass of one example: patch embedding of every
  patch, the encoder on the CLS token and the kept patches, the decoder on every token, the pixel head."""
  cfg = ViTConfig.from_config(model_cfg)
  rank = len(image_shape) - 1
  ps = cfg.patch_size(rank)
  num_patches = math.prod(grid_shape(image_shape[:-1], ps))
  patch_dim = math.prod(ps) * cfg.channels(rank)
  keep = int(num_patches * (1 - mask_ratio))

  def blocks(tokens, width, depth):
    hidden = int(width * cfg.mlp_ratio)
    per_block = 2 * tokens * width * (3 * width + width + 2 * hidden) + 2 * 2 * tokens * tokens * width
    return depth * per_block

  enc_tokens, dec_tokens = 1 + keep, 1 + num_patches
  flops = 2 * num_patches * patch_dim * cfg.width
  flops += blocks(enc_tokens, cfg.width, cfg.depth)
  flops += 2 * enc_tokens * cfg.width * cfg.decoder_width
  flops += blocks(dec_tokens, cfg.decoder_width, cfg.decoder_depth)
  flops += 2 * dec_tokens * cfg.decoder_width * patch_dim
  return int(flops)


def mae_train_step_flops(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int], batch: int,
                         mask_ratio: float) -> int:
  """Matmul FLOPs of one pre-training step: forward plus backward (twice the forward) over the batch."""
  return 3 * batch * vit_mae_forward_flops(model_cfg, image_shape, mask_ratio)
