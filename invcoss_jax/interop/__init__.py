"""PyTorch <-> Flax weights: MAE, timm and MedCoSS state dicts in; the encoder out as timm safetensors.

PyTorch is needed only to read `.pth` files; `.safetensors` files are read and written without it.
"""

from invcoss_jax.interop.checkpoint_io import read_state_dict, write_safetensors
from invcoss_jax.interop.config import interop_config
from invcoss_jax.interop.convert import (CheckpointMismatchError, ConversionReport, convert_state_dict,
                                         load_torch_into_params)
from invcoss_jax.interop.export import export_timm_encoder, read_export_metadata, timm_state_dict
from invcoss_jax.interop.layouts import LAYOUTS, MAE_MODEL, MEDCOSS_MODEL, detect_layout, model_overrides

__all__ = [
    "CheckpointMismatchError", "ConversionReport", "LAYOUTS", "MAE_MODEL", "MEDCOSS_MODEL", "convert_state_dict",
    "detect_layout", "export_timm_encoder", "interop_config", "load_torch_into_params", "model_overrides",
    "read_export_metadata", "read_state_dict", "timm_state_dict", "write_safetensors",
]
