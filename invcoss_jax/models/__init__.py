"""Models: the dimension-free ViT-MAE and the inversion generators."""

from invcoss_jax.models.cmi_generator import CMIGenerator
from invcoss_jax.models.invunet import InvUNet
from invcoss_jax.models.patching import patchify, unpatchify, grid_shape
from invcoss_jax.models.presets import model_config, num_params, PRESETS
from invcoss_jax.models.vit_mae import (MAE, ViTConfig, block_tokens, build_mae, init_mae_params, masked_mse,
                                        normalized_pixel_targets, random_masking, spatial_rank)

__all__ = [
    "CMIGenerator", "InvUNet", "MAE", "PRESETS", "ViTConfig", "block_tokens", "build_mae", "grid_shape", "init_mae_params", "masked_mse",
    "model_config", "normalized_pixel_targets", "num_params", "patchify", "random_masking", "spatial_rank",
    "unpatchify",
]
