"""PyTorch <-> Flax weights: MAE, timm and MedCoSS state dicts in; the encoder out as timm safetensors.

PyTorch is needed only to read `.pth` files; `.safetensors` files are read and written without it.
"""

__all__ = [
    "CheckpointMismatchError", "ConversionReport", "LAYOUTS", "MAE_MODEL", "MEDCOSS_MODEL", "convert_state_dict",
    "detect_layout", "export_timm_encoder", "interop_config", "load_torch_into_params", "model_overrides",
    "read_export_metadata", "read_state_dict", "timm_state_dict", "write_safetensors",
]

# Imported on first use (PEP 562), so that reading a config section (defaults.base_config) does not import
# jax, flax or grain through this package.
_EXPORTS = {
    "CheckpointMismatchError": "invcoss_jax.interop.convert",
    "ConversionReport": "invcoss_jax.interop.convert",
    "LAYOUTS": "invcoss_jax.interop.layouts",
    "MAE_MODEL": "invcoss_jax.interop.layouts",
    "MEDCOSS_MODEL": "invcoss_jax.interop.layouts",
    "convert_state_dict": "invcoss_jax.interop.convert",
    "detect_layout": "invcoss_jax.interop.layouts",
    "export_timm_encoder": "invcoss_jax.interop.export",
    "interop_config": "invcoss_jax.interop.config",
    "load_torch_into_params": "invcoss_jax.interop.convert",
    "model_overrides": "invcoss_jax.interop.layouts",
    "read_export_metadata": "invcoss_jax.interop.export",
    "read_state_dict": "invcoss_jax.interop.checkpoint_io",
    "timm_state_dict": "invcoss_jax.interop.export",
    "write_safetensors": "invcoss_jax.interop.checkpoint_io",
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
