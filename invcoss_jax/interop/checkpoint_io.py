"""Reading PyTorch state dicts (`.safetensors` without PyTorch, `.pth` with it) and writing safetensors.

A state dict here is a flat `dict[str, np.ndarray]`. Floating tensors come back as float32 (bf16 and fp16
checkpoints included); the wrappers training scripts put around a state dict (`{'model': ...}`,
`{'state_dict': ...}`, DDP's `module.` prefix) are removed.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping

import numpy as np

from invcoss_jax import io_utils

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Where training scripts keep the weights inside a checkpoint, in order of preference. MAE and MedCoSS
# save {'model': ..., 'optimizer': ..., 'epoch': ..., 'args': Namespace}; MedCoSS adds 'teacher_model'.
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "net")


def read_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint as float32 NumPy arrays, keyed by their state-dict names.

  `.safetensors` files are read with `safetensors` alone. `.pth`/`.pt`/`.bin`/`.ckpt` files need PyTorch and
  are unpickled with `torch.load(weights_only=True)` (no arbitrary code runs; `argparse.Namespace`, which MAE
  and MedCoSS save next to the weights, is allowed). `key` picks the entry of a wrapped checkpoint
  (default: 'model', then 'state_dict', ...).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist (config.init_from_torch)")
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    raw = _read_safetensors(path)
  elif lower.endswith(TORCH_SUFFIXES):
    raw = _read_torch_pickle(path)
  else:
    raise ValueError(f"{path!r}: unknown checkpoint format; expected a file ending in "
                     f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}")
  return _unwrap(raw, path, key)


def _read_safetensors(path: str) -> dict[str, Any]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  out = {}
  with safe_open(path, framework="numpy") as f:
    for name in f.keys():
      try:
        out[name] = f.get_tensor(name)
      except TypeError:
        out[name] = None  # bfloat16 has no NumPy dtype: read below through ml_dtypes.
  missing = [k for k, v in out.items() if v is None]
  if missing:
    with safe_open(path, framework="flax") as f:
      for name in missing:
        out[name] = np.asarray(f.get_tensor(name).astype("float32"))
  return out


def _read_torch_pickle(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs PyTorch (only .pth files do); install torch, or convert the "
                      "file once with `python -m invcoss_jax.interop.to_safetensors IN.pth OUT.safetensors` on "
                      "a machine that has it and point config.init_from_torch at the .safetensors file") from e
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError and friends; the message names the offending global.
    raise ValueError(f"{path!r} cannot be read safely with torch.load(weights_only=True): {e}\n"
                     "If you trust the file, re-save its state dict (torch.save(ckpt['model'], 'clean.pth')) "
                     "or convert it to safetensors.") from e
  return _torch_to_numpy(obj)


def _torch_to_numpy(obj: Any) -> Any:
  import torch  # pylint: disable=g-import-not-at-top

  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
  if isinstance(obj, Mapping):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  return obj


def _is_state_dict(d: Any) -> bool:
  return isinstance(d, Mapping) and bool(d) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                                   for k, v in d.items())


def _unwrap(raw: Any, path: str, key: str | None) -> dict[str, np.ndarray]:
  obj = raw
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      have = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
      raise KeyError(f"{path!r} has no entry {key!r}; it has {have}")
    obj = obj[key]
  elif not _is_state_dict(obj) and isinstance(obj, Mapping):
    for k in _WRAPPER_KEYS:
      if k in obj and _is_state_dict(obj[k]):
        obj = obj[k]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not tensors:
    raise ValueError(f"{path!r} holds no tensors at the top level or under {_WRAPPER_KEYS}; "
                     f"top-level entries: {sorted(map(str, obj))[:20]}")
  if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
    tensors = {k[len("module."):]: v for k, v in tensors.items()}
  return {k: (v.astype(np.float32) if _is_float(v.dtype) else v) for k, v in tensors.items()}


def _is_float(dtype: np.dtype) -> bool:
  # ml_dtypes' bfloat16 (what safetensors returns once jax is imported) is not a NumPy floating subtype.
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, Any] | None = None) -> None:
  """Writes `tensors` (contiguous float32 copies) to a safetensors file atomically. `metadata` values that are
  not strings are stored as JSON (safetensors metadata is str -> str)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
  meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
  with io_utils.atomic_path(path) as tmp:
    save_file(arrays, tmp, metadata=meta)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(os.fspath(path), framework="numpy") as f:
    return dict(f.metadata() or {})
