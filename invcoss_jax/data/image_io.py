"""Reading 2D images (PNG/JPEG/... with Pillow) and arrays in `.npz` files without loading them whole."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from invcoss_jax import npz_io
from invcoss_jax.data.errors import DataError


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as (H, W) or (H, W, C) in its stored dtype (palette images become RGB), turned upright
  as its EXIF orientation says (`ImageOps.exif_transpose`, what viewers show: a phone photo of a film
  is stored sideways with an orientation tag)."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      ImageOps.exif_transpose(im, in_place=True)
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


def check_image_size(shape: tuple[int, ...], path: str, min_size: int, what: str = "an image") -> None:
  """Refuses 2D images with a side below `min_size` pixels (`data.min_image_size`, capped at the output
  size): resized to the model's input, a 1x1 or 7x7 image would be upsampled into patches that hold no
  more than a pixel or two, silently."""
  h, w = int(shape[0]), int(shape[1])
  if min_size > 0 and min(h, w) < min_size:
    raise DataError(path, f"{what} of {h}x{w} pixels: expected at least {min_size}x{min_size} "
                    "(data.min_image_size: a smaller image would be upsampled from less than one patch; 0 "
                    "accepts any size)")


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
