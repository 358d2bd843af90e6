"""Models: the dimension-free ViT-MAE and the inversion generators."""

__all__ = [
    "CMIGenerator", "InvUNet", "MAE", "PRESETS", "ViTConfig", "block_tokens", "build_mae", "grid_shape", "init_mae_params", "masked_mse",
    "model_config", "normalized_pixel_targets", "num_params", "patchify", "random_masking", "spatial_rank",
    "unpatchify",
]

# Imported on first use (PEP 562), so that reading a config section (defaults.base_config) does not import
# jax, flax or grain through this package.
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
    "model_config": "invcoss_jax.models.presets",
    "normalized_pixel_targets": "invcoss_jax.models.vit_mae",
    "num_params": "invcoss_jax.models.presets",
    "patchify": "invcoss_jax.models.patching",
    "random_masking": "invcoss_jax.models.vit_mae",
    "spatial_rank": "invcoss_jax.models.vit_mae",
    "unpatchify": "invcoss_jax.models.patching",
}


def __getattr__(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    try:
      value = importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. `data.text_io`
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
