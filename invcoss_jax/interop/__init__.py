"""PyTorch <-> Flax weights: MAE, timm and MedCoSS state dicts in; the encoder out as timm safetensors.

PyTorch is needed only to read `.pth` files; `.safetensors` files are read and written without it.
"""

from invcoss_jax.lazy import lazy_attributes

__all__ = [
    "CheckpointMismatchError", "ConversionReport", "LAYOUTS", "MAE_MODEL", "MEDCOSS_MODEL", "convert_state_dict",
    "detect_layout", "export_timm_encoder", "interop_config", "load_torch_into_params", "model_overrides",
    "read_export_metadata", "read_state_dict", "timm_state_dict", "write_safetensors",
]

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

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
