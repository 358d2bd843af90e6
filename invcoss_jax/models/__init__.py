"""Models: the dimension-free ViT-MAE and the inversion generators."""

from invcoss_jax.lazy import lazy_attributes

__all__ = [
    "CMIGenerator", "InvUNet", "MAE", "PRESETS", "ViTConfig", "block_tokens", "build_mae", "grid_shape", "init_mae_params", "masked_mse", "mlm_loss",
    "model_config", "normalized_pixel_targets", "num_params", "patchify", "random_masking", "spatial_rank",
    "unpatchify",
]

_EXPORTS = {
    "CMIGenerator": "invcoss_jax.models.cmi_generator",
    "InvUNet": "invcoss_jax.models.invunet",
    "MAE": "invcoss_jax.models.vit_mae",
    "PRESETS": "invcoss_jax.models.presets",
    "ViTConfig": "invcoss_jax.models.vit_mae",
    "block_tokens": "invcoss_jax.models.vit_mae",
    "build_mae": "invcoss_jax.models.vit_mae",
    "grid_shape": "invcoss_jax.models.patching",
    "init_mae_params": "invcoss_jax.models.vit_mae",
    "masked_mse": "invcoss_jax.models.vit_mae",
    "mlm_loss": "invcoss_jax.models.vit_mae",
    "model_config": "invcoss_jax.models.presets",
    "normalized_pixel_targets": "invcoss_jax.models.vit_mae",
    "num_params": "invcoss_jax.models.presets",
    "patchify": "invcoss_jax.models.patching",
    "random_masking": "invcoss_jax.models.vit_mae",
    "spatial_rank": "invcoss_jax.models.vit_mae",
    "unpatchify": "invcoss_jax.models.patching",
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
