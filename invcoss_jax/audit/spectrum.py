"""Radial power spectra of images and volumes, and their high-frequency energy ratio.

For a sample `x` (2D `(H, W, C)` or 3D `(D, H, W, C)`) the power spectrum is `P(k) = sum_c |FFT(x_c - mean
x_c)|^2` over the spatial axes. Each frequency `k` has the normalised radius

    rho(k) = sqrt(sum_i (f_i / 0.5)^2),   f_i in cycles per pixel (voxel), |f_i| <= 0.5,

so `rho = 1` is the Nyquist frequency along one axis (corners reach sqrt(2) in 2D, sqrt(3) in 3D). The
high-frequency energy ratio above a cutoff `c` is `sum_{rho > c} P / sum_{rho > 0} P`: the share of the
image's variance (by Parseval) carried by detail finer than `2 / c` pixels. A constant image has ratio 0.
"""

from __future__ import annotations

import numpy as np


def _spatial(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim not in (4, 5):
    raise ValueError(f"{name} must be images (B, H, W, C) or volumes (B, D, H, W, C), got shape {x.shape}")
  return x


def normalised_radius(spatial_shape: tuple[int, ...]) -> np.ndarray:
  """`rho` of every FFT bin of a grid of `spatial_shape` (in np.fft order), 1 = Nyquist along an axis."""
  freqs = [np.fft.fftfreq(n) / 0.5 for n in spatial_shape]
  grids = np.meshgrid(*freqs, indexing="ij")
  return np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))


def power_spectrum(x: np.ndarray) -> np.ndarray:
  """(B, *spatial) float64: per-sample power of the mean-removed channels, summed over channels."""
  x = _spatial(x, "power_spectrum input").astype(np.float64)
  axes = tuple(range(1, x.ndim - 1))
  x = x - x.mean(axis=axes, keepdims=True)
  return np.sum(np.abs(np.fft.fftn(x, axes=axes)) ** 2, axis=-1)


def high_frequency_energy_ratio(x: np.ndarray, cutoff: float = 0.5) -> np.ndarray:
  """(B,) float64: the share of each sample's (non-DC) spectral energy at normalised radius > `cutoff`."""
  if not cutoff >= 0.0:
    raise ValueError(f"config.audit.hf_cutoff must be >= 0 (1 = Nyquist), got {cutoff}")
  p = power_spectrum(x)
  rho = normalised_radius(p.shape[1:])
  flat = p.reshape(p.shape[0], -1)
  total = flat.sum(axis=1)
  high = flat[:, (rho > cutoff).reshape(-1)].sum(axis=1)
  return np.where(total > 0, high / np.where(total > 0, total, 1.0), 0.0)


def radial_profile(x: np.ndarray, num_bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """(bin centres (num_bins,), mean power per radius bin (B, num_bins)) over `0 < rho <= 1`, for plots.

  Bins beyond the axis Nyquist (the grid's corners) are left out so every bin is a full shell; a bin that
  holds no frequency of the grid (finer bins than the grid's frequency spacing) is NaN.
  """
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  p = power_spectrum(x)
  rho = normalised_radius(p.shape[1:]).reshape(-1)
  flat = p.reshape(p.shape[0], -1)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  which = np.digitize(rho, edges[1:-1], right=True)  # bin of each frequency (rho == 0 -> bin 0)
  keep = (rho > 0) & (rho <= 1.0)
  counts = np.bincount(which[keep], minlength=num_bins).astype(np.float64)
  sums = np.stack([np.bincount(which[keep], weights=row[keep], minlength=num_bins) for row in flat])
  centres = 0.5 * (edges[1:] + edges[:-1])
  return centres, np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)
