"""Reading 2D images (PNG/JPEG/... with Pillow) and arrays in `.npz` files without loading them whole."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from invcoss_jax import npz_io
from invcoss_jax.data.errors import DataError


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as (H, W) or (H, W, C) in its stored dtype (palette images become RGB)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
      elif im.mode == "CMYK":
        im = im.convert("RGB")
      arr = np.asarray(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(path, f"cannot decode the image ({type(e).__name__}: {e}); expected a complete "
                    "PNG/JPEG/BMP/TIFF file") from e
  if arr.ndim not in (2, 3):
    raise DataError(path, f"expected a 2D image, got an array of shape {arr.shape}")
  return arr


def npz_array_info(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of every array in an .npz file, read from the .npy headers only."""
  path = os.fspath(path)
  try:
    out = npz_io.npz_headers(path)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise DataError(path, f"cannot read the .npz file ({type(e).__name__}: {e}); expected an "
                    "uncorrupted NumPy .npz archive") from e
  return out


def load_npz_array(path: str | os.PathLike, key: str) -> np.ndarray:
  """One array of an .npz file (decompressed in full: .npz members cannot be memory-mapped)."""
  path = os.fspath(path)
  try:
    return npz_io.load_npz(path, [key])[key]
  except KeyError as e:
    raise DataError(path, f"expected an array named {key!r} ({e.args[0] if e.args else e})") from e
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise DataError(path, f"cannot read array {key!r} ({type(e).__name__}: {e}); expected an "
                    "uncorrupted NumPy .npz archive") from e
