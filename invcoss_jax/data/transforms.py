"""Modality preprocessing and augmentation as NumPy functions (no JAX: they run in grain workers).

Text (report): token ids from the source, checked and passed on (`ReportTokens`).

2D (X-ray, pathology): intensities to [0, 1], grey -> RGB, RandomResizedCrop + flips when training,
resizing with Pillow (antialiased, like torchvision). 3D (CT, MRI): a volume of spacing s is seen on a
grid of `target_spacing` t; depth windows of that grid (plus an optional central in-plane crop) are
resized to `volume_shape`. Resampling to t and resizing the window are one linear coordinate map, so
they are done in a single `scipy.ndimage.affine_transform` of the slab the window covers (MedCoSS
resamples then resizes, interpolating twice). Label maps follow with nearest-neighbour interpolation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

_PIL_METHODS = ("nearest", "bilinear", "bicubic")

# ----------------------------------------------------------------------------------------------------
# Intensities.


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """float32 in [0, 1]: uint8 / 255, bool as 0/1, floats already in [0, 1] kept, anything else
  (uint16 X-rays, signed or float data) min-max scaled per image (a constant image becomes 0)."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if image.dtype == bool:
    return image.astype(np.float32)
  x = image.astype(np.float32)
  lo, hi = float(np.min(x)), float(np.max(x))
  if np.issubdtype(image.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
    return x
  if hi <= lo:
    return np.zeros_like(x)
  return (x - lo) / (hi - lo)


def hu_to_unit(volume: np.ndarray, hu_clip: Sequence[float], hu_offset: float = 0.0) -> np.ndarray:
  """CT values + offset, clipped to [lo, hi] HU and mapped linearly to [-1, 1] (lo -> -1, hi -> 1)."""
  lo, hi = float(hu_clip[0]), float(hu_clip[1])
  if not hi > lo:
    raise ValueError(f"data.ct.hu_clip={tuple(hu_clip)}: expected (low, high) with low < high")
  x = np.clip(volume.astype(np.float32) + np.float32(hu_offset), lo, hi)
  return ((x - lo) * np.float32(2.0 / (hi - lo)) - 1.0).astype(np.float32)


def percentile_zscore(x: np.ndarray, percentiles: Sequence[float], eps: float = 1e-6) -> np.ndarray:
  """Clip to the given percentiles of `x`, then z-score (float64 statistics, float32 result).

  The clip bounds any intensity outlier; z-scoring removes the file's intensity scale, so volumes
  stored 100x brighter give the same output. A constant input gives zeros. |output| <= sqrt(n - 1).
  """
  x = x.astype(np.float32)
  lo, hi = np.percentile(x, [float(percentiles[0]), float(percentiles[1])])
  x = np.clip(x, lo, hi).astype(np.float64)
  std = x.std()
  if std < eps * max(1.0, abs(x.mean())):
    return np.zeros(x.shape, np.float32)
  return ((x - x.mean()) / std).astype(np.float32)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """(H, W) or (H, W, C) -> (H, W, channels): grey repeated, alpha dropped, RGB averaged to grey."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] in (2, 4):  # grey+alpha, RGBA
    image = image[..., :-1]
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 1:
    return np.repeat(image, channels, axis=-1)
  if channels == 1:
    return image.mean(-1, keepdims=True, dtype=np.float32).astype(image.dtype)
  raise ValueError(f"cannot turn {c} channels into {channels}")


# ----------------------------------------------------------------------------------------------------
# 2D geometry.


def resize_2d(image: np.ndarray, size: Sequence[int], method: str = "bilinear",
              box: Sequence[float] | None = None) -> np.ndarray:
  """Resize (H, W) or (H, W, C) float32 (or an int label map with 'nearest') to `size` = (h, w).

  `box` = (top, left, height, width) in input pixels crops before resizing (one interpolation).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if method not in _PIL_METHODS:
    raise ValueError(f"interpolation {method!r}: expected one of {_PIL_METHODS}")
  resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}[method]
  h, w = int(size[0]), int(size[1])
  pil_box = None if box is None else (box[1], box[0], box[1] + box[3], box[0] + box[2])
  is_int = np.issubdtype(image.dtype, np.integer)
  if is_int and method != "nearest":
    raise ValueError("integer label maps are resized with 'nearest' only")
  planes = image[..., None] if image.ndim == 2 else image
  out = []
  for c in range(planes.shape[-1]):
    p = planes[..., c].astype(np.int32 if is_int else np.float32)
    im = Image.fromarray(p, mode=None)
    out.append(np.asarray(im.resize((w, h), resample=resample, box=pil_box)))
  res = np.stack(out, -1)
  res = res.astype(np.int32 if is_int else np.float32)
  return res[..., 0] if image.ndim == 2 else res


def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, h, w) of torchvision's RandomResizedCrop: area fraction in `scale`, aspect ratio
  log-uniform in `ratio`, 10 attempts, then a central crop clamped to `ratio`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------------------
# 3D geometry.


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
  """How a volume becomes examples of `out_shape` (D, H, W)."""
  out_shape: tuple[int, int, int]
  target_spacing: tuple[float, float, float] | None  # None keeps the file's grid
  window_depth: int  # slices of the target grid per window ('windows' mode)
  window_stride: int
  mode: str = "windows"  # windows | whole
  trim_fraction: float = 0.0  # of the target-grid slices dropped at each end before windowing
  crop_fraction: float = 1.0  # central in-plane crop (both axes) when the plane is wider than ...
  crop_min_size: int = 0  # ... this many target-grid voxels
  order: int = 1  # spline order of the image resampling

  def __post_init__(self):
    if self.mode not in ("windows", "whole"):
      raise ValueError(f"data.volume_mode={self.mode!r}: expected 'windows' or 'whole'")
    if len(self.out_shape) != 3 or min(self.out_shape) <= 0:
      raise ValueError(f"data.volume_shape={self.out_shape}: expected three positive sizes (D, H, W)")
    if self.mode == "windows" and (self.window_depth <= 0 or self.window_stride <= 0):
      raise ValueError(f"window depth {self.window_depth} / stride {self.window_stride}: expected > 0")
    if not 0.0 <= self.trim_fraction < 0.5:
      raise ValueError(f"trim_fraction={self.trim_fraction}: expected a fraction in [0, 0.5)")
    if not 0.0 < self.crop_fraction <= 1.0:
      raise ValueError(f"center_crop_fraction={self.crop_fraction}: expected a fraction in (0, 1]")


def _ratio(spacing: Sequence[float], target: Sequence[float] | None) -> np.ndarray:
  """target / source spacing per axis: source voxels per target-grid voxel."""
  if target is None:
    return np.ones(3)
  return np.asarray(target, float) / np.asarray(spacing, float)


def target_grid_shape(shape: Sequence[int], spacing: Sequence[float],
                      target_spacing: Sequence[float] | None) -> tuple[int, int, int]:
  """Shape of the volume resampled to `target_spacing` (the physical extent kept, rounded)."""
  r = _ratio(spacing, target_spacing)
  return tuple(max(1, int(round(n / q))) for n, q in zip(shape, r))


def window_starts(depth: int, geometry: VolumeGeometry) -> list[int]:
  """First target-grid slice of every window of a volume `depth` target-grid slices deep.

  Windows of `window_depth` slices every `window_stride` slices, inside the range left after trimming
  `trim_fraction` at each end; none when the range is shorter than one window. 'whole' mode: [0].
  """
  if geometry.mode == "whole":
    return [0]
  trim = int(round(depth * geometry.trim_fraction))
  lo, hi = trim, depth - trim
  if hi - lo < geometry.window_depth:
    return []
  return list(range(lo, hi - geometry.window_depth + 1, geometry.window_stride))


def window_map(shape: Sequence[int], spacing: Sequence[float], start: int,
               geometry: VolumeGeometry) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) per axis with source index = scale * output index + offset for one example.

  Voxel centres: target-grid voxel j covers [j, j+1) target units; source voxel i has its centre at
  (i + 0.5) source units. 'whole' mode maps the full physical extent onto `out_shape`.
  """
  shape = np.asarray(shape, float)
  out = np.asarray(geometry.out_shape, float)
  r = _ratio(spacing, geometry.target_spacing)
  grid = np.asarray(target_grid_shape(shape, spacing, geometry.target_spacing), float)
  lo = np.zeros(3)
  length = shape / r  # extent in target units
  if geometry.mode == "windows":
    lo[0], length[0] = float(start), float(geometry.window_depth)
  if geometry.crop_fraction < 1.0 and grid[2] > geometry.crop_min_size:
    for ax in (1, 2):
      keep = length[ax] * geometry.crop_fraction
      lo[ax] += (length[ax] - keep) / 2.0
      length[ax] = keep
  scale = length / out * r
  offset = (lo + 0.5 * length / out) * r - 0.5
  return scale, offset


def resample(volume: np.ndarray, scale: np.ndarray, offset: np.ndarray, out_shape: Sequence[int],
             order: int) -> np.ndarray:
  """`volume` sampled at source coordinates scale * o + offset (edge values beyond the border).

  Only the slab of the input the output touches is passed to scipy (it matters for large volumes
  and spline orders > 1, whose prefilter runs over the whole input).
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  scale = np.asarray(scale, float)
  offset = np.asarray(offset, float).copy()
  out_shape = tuple(int(s) for s in out_shape)
  margin = max(2, order + 1)
  slices = []
  for ax in range(3):
    first = offset[ax]
    last = scale[ax] * (out_shape[ax] - 1) + offset[ax]
    a = max(0, int(math.floor(min(first, last))) - margin)
    b = min(volume.shape[ax], int(math.ceil(max(first, last))) + margin + 1)
    if b <= a:  # the whole output lies beyond one border: keep the edge slice
      a, b = (0, 1) if last < 0 else (volume.shape[ax] - 1, volume.shape[ax])
    slices.append(slice(a, b))
    offset[ax] -= a
  slab = volume[tuple(slices)]
  if np.issubdtype(slab.dtype, np.integer):
    if order != 0:
      raise ValueError("integer label maps are resampled with order 0 only")
    slab = slab.astype(np.int32)
  else:
    slab = slab.astype(np.float32)
  return ndimage.affine_transform(slab, scale, offset=offset, output_shape=out_shape, order=order,
                                  mode="nearest", prefilter=order > 1)


def resample_to_spacing(volume: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
                        order: int = 1) -> np.ndarray:
  """The whole volume on the `target_spacing` grid (for sliding-window inference at native size)."""
  geometry = VolumeGeometry(target_grid_shape(volume.shape, spacing, target_spacing),
                            tuple(target_spacing), 1, 1, mode="whole")
  scale, offset = window_map(volume.shape, spacing, 0, geometry)
  return resample(volume, scale, offset, geometry.out_shape, order)


def random_flip(arrays: Sequence[np.ndarray | None], axes: Sequence[int], prob: float,
                rng: np.random.Generator) -> list[np.ndarray | None]:
  """Flips all `arrays` together along each of `axes` independently with probability `prob`."""
  flips = [ax for ax in axes if prob > 0 and rng.uniform() < prob]
  out = []
  for a in arrays:
    if a is not None and flips:
      a = np.ascontiguousarray(np.flip(a, axis=tuple(flips)))
    out.append(a)
  return out


# ----------------------------------------------------------------------------------------------------
# Per-modality preprocessors: record from a source -> model example. rng=None means no augmentation.


def _finish(record: dict[str, Any], image: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
  out = {"image": np.ascontiguousarray(image, dtype=np.float32)}
  if "label" in record:
    out["label"] = np.asarray(record["label"], np.int32)
  if mask is not None:
    out["mask"] = np.ascontiguousarray(mask, dtype=np.int32)
  return out


@dataclasses.dataclass(frozen=True)
class Natural2D:
  """X-ray and pathology: [0, 1], `channels`, RandomResizedCrop + flips (train) or resize (eval)."""
  image_size: int
  channels: int = 3
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  hflip: bool = True
  vflip: bool = False
  interpolation: str = "bicubic"

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None):
    image = to_unit_range(record["image"])
    # A grey image bound for RGB is cropped, resized and flipped as one plane and repeated at the end: the
    # same pixels as repeating first (every step acts per channel) at a third of the cost.
    grey = image.ndim == 2 or image.shape[-1] in (1, 2)
    image = to_channels(image, 1 if grey else self.channels)
    mask = record.get("mask")
    h, w = image.shape[:2]
    box = None
    if rng is not None:
      box = random_resized_crop_box(h, w, self.crop_scale, self.crop_ratio, rng)
    size = (self.image_size, self.image_size)
    image = np.clip(resize_2d(image, size, self.interpolation, box), 0.0, 1.0)
    if mask is not None:
      mask = resize_2d(np.asarray(mask, np.int32), size, "nearest", box)
    if rng is not None:
      axes = ([1] if self.hflip else []) + ([0] if self.vflip else [])
      image, mask = random_flip([image, mask], axes, 0.5, rng)
    return _finish(record, to_channels(image, self.channels), mask)


@dataclasses.dataclass(frozen=True)
class Slice2D:
  """2D CT or MRI slices: HU -> [-1, 1] (CT) or percentile clip + z-score (MRI), 1 channel, resize,
  random flips."""
  image_size: int
  modality: str
  hu_clip: tuple[float, float] = (-1024.0, 1024.0)
  hu_offset: float = 0.0
  percentile_clip: tuple[float, float] = (0.2, 99.8)
  mirror_prob: float = 0.0

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None):
    image = np.asarray(record["image"], np.float32)
    if image.ndim == 3:
      image = image.mean(-1)
    size = (self.image_size, self.image_size)
    if self.modality == "ct":
      image = np.clip(resize_2d(hu_to_unit(image, self.hu_clip, self.hu_offset), size), -1.0, 1.0)
    else:
      image = percentile_zscore(resize_2d(image, size), self.percentile_clip)
    mask = record.get("mask")
    if mask is not None:
      mask = resize_2d(np.asarray(mask, np.int32), size, "nearest")
    if rng is not None:
      image, mask = random_flip([image, mask], (0, 1), self.mirror_prob, rng)
    return _finish(record, image[..., None], mask)


@dataclasses.dataclass(frozen=True)
class Volume3D:
  """CT or MRI windows: intensity mapping, one resampling to `geometry.out_shape`, random mirroring.

  Records carry the raw (D, H, W) volume, its spacing and the window start on the target grid.
  """
  geometry: VolumeGeometry
  modality: str
  hu_clip: tuple[float, float] = (-1024.0, 1024.0)
  hu_offset: float = 0.0
  percentile_clip: tuple[float, float] = (0.2, 99.8)
  mirror_prob: float = 0.0

  def prepare(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The deterministic part (intensity mapping and resampling): what `data.window_cache_size` keeps."""
    volume = record["image"]
    spacing = record.get("spacing", (1.0, 1.0, 1.0))
    scale, offset = window_map(volume.shape, spacing, int(record.get("start", 0)),
                               self.geometry)
    out = self.geometry.out_shape
    if self.modality == "ct":
      # Clip first (as MedCoSS does) so that interpolation never mixes in out-of-range HU values.
      image = resample(hu_to_unit(volume, self.hu_clip, self.hu_offset), scale, offset, out,
                       self.geometry.order)
      image = np.clip(image, -1.0, 1.0)
    else:
      image = percentile_zscore(resample(volume, scale, offset, out, self.geometry.order),
                                self.percentile_clip)
    mask = record.get("mask")
    if mask is not None:
      mask = resample(np.asarray(mask, np.int32), scale, offset, out, 0)
    return _finish(record, image[..., None], mask)

  def augment(self, prepared: dict[str, np.ndarray], rng: np.random.Generator | None = None):
    """The random part (mirroring) of an example from `prepare`."""
    if rng is None:
      return prepared
    image, mask = random_flip([prepared["image"], prepared.get("mask")], (0, 1, 2), self.mirror_prob, rng)
    out = dict(prepared, image=image)
    if mask is not None:
      out["mask"] = mask
    return out

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None):
    return self.augment(self.prepare(record), rng)


@dataclasses.dataclass(frozen=True)
class Preprocessed:
  """Arrays already in model layout and range (e.g. synthetic shards): resized to `shape` if needed.

  With an `rng` (the train iterator with data.augment_preprocessed) they get the modality's geometric
  augmentation: 2D RandomResizedCrop (`crop_scale`, `crop_ratio`) and flips, 3D random mirroring per axis
  with `mirror_prob`, as MedCoSS's replay buffer, which re-reads its samples through the stage's transform."""
  shape: tuple[int, ...]  # per-example shape, channels last
  crop_scale: tuple[float, float] | None = None  # 2D; None: no crop
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  hflip: bool = False
  vflip: bool = False
  mirror_prob: float = 0.0  # 3D

  def _augment(self, image: np.ndarray, mask, rng: np.random.Generator):
    if len(self.shape) == 3:
      if self.crop_scale is not None:
        box = random_resized_crop_box(image.shape[0], image.shape[1], self.crop_scale, self.crop_ratio, rng)
        lo, hi = float(image.min()), float(image.max())
        image = np.clip(resize_2d(image, self.shape[:2], "bilinear", box), lo, hi)
        if mask is not None:
          mask = resize_2d(np.asarray(mask, np.int32), self.shape[:2], "nearest", box)
      axes = ([1] if self.hflip else []) + ([0] if self.vflip else [])
      return random_flip([image, mask], axes, 0.5, rng)
    return random_flip([image, mask], (0, 1, 2), self.mirror_prob, rng)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None):
    image = np.asarray(record["image"], np.float32)
    if image.ndim == len(self.shape) - 1:
      image = image[..., None]
    if image.ndim != len(self.shape) or image.shape[-1] != self.shape[-1]:
      raise ValueError(f"preprocessed example of shape {image.shape}: expected {self.shape} "
                       "(channels last)")
    mask = record.get("mask")
    if image.shape != tuple(self.shape):
      if len(self.shape) == 3:
        image = resize_2d(image, self.shape[:2], "bilinear")
        if mask is not None:
          mask = resize_2d(np.asarray(mask, np.int32), self.shape[:2], "nearest")
      else:
        scale = np.asarray(image.shape[:3], float) / np.asarray(self.shape[:3], float)
        offset = 0.5 * scale - 0.5
        image = resample(image[..., 0], scale, offset, self.shape[:3], 1)[..., None]
        if mask is not None:
          mask = resample(np.asarray(mask, np.int32), scale, offset, self.shape[:3], 0)
    if rng is not None:
      image, mask = self._augment(image, mask, rng)
    return _finish(record, image, mask)


@dataclasses.dataclass(frozen=True)
class ReportTokens:
  """Report examples: the source's token ids, checked to be (max_length,) and returned as int32 copies.

  Text is not augmented (its masking belongs to the pre-training objective, which uses `word_ids`), so
  training and evaluation give the same arrays; `rng` is accepted and unused."""
  max_length: int

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None):
    out = {}
    for key in ("tokens", "attention_mask", "word_ids"):
      a = np.asarray(record[key])
      if a.shape != (self.max_length,):
        raise ValueError(f"report example {key!r} of shape {a.shape}: expected ({self.max_length},) "
                         "(data.text.max_length)")
      out[key] = a.astype(np.int32)
    if "label" in record:
      out["label"] = np.asarray(record["label"], np.int32)
    return out
