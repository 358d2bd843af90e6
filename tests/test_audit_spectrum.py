"""Radial power spectrum and high-frequency energy ratio, 2D and 3D: Parseval, plane waves, white noise,
smoothing, invariances."""

import numpy as np
import pytest
from scipy import ndimage

from invcoss_jax.audit import spectrum


def plane_wave(shape, cycles):
  """cos(2 pi sum_i cycles_i x_i / n_i) on a grid, as (1, *shape, 1)."""
  grids = np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij")
  return np.cos(2 * np.pi * sum(c * g for c, g in zip(cycles, grids)))[None, ..., None]


def test_parseval_total_energy_is_the_variance_times_size():
  x = np.random.default_rng(0).normal(size=(3, 12, 10, 3))
  p = spectrum.power_spectrum(x)
  centred = x - x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(p.sum(axis=(1, 2)), 120 * (centred ** 2).sum(axis=(1, 2, 3)), rtol=1e-10)


@pytest.mark.parametrize("shape,low,high", [((32, 32), (2, 3), (12, 9)), ((16, 16, 16), (1, 2, 1), (6, 5, 4))])
def test_plane_waves_land_on_their_side_of_the_cutoff(shape, low, high):
  # rho of a wave with c_i cycles over n_i samples is sqrt(sum (2 c_i / n_i)^2).
  assert np.sqrt(sum((2 * c / n) ** 2 for c, n in zip(low, shape))) < 0.5
  assert np.sqrt(sum((2 * c / n) ** 2 for c, n in zip(high, shape))) > 0.5
  np.testing.assert_allclose(spectrum.high_frequency_energy_ratio(plane_wave(shape, low), 0.5), 0.0, atol=1e-12)
  np.testing.assert_allclose(spectrum.high_frequency_energy_ratio(plane_wave(shape, high), 0.5), 1.0, atol=1e-12)
  mixed = plane_wave(shape, low) + 0.5 * plane_wave(shape, high)  # energies 1 : 0.25
  np.testing.assert_allclose(spectrum.high_frequency_energy_ratio(mixed, 0.5), 0.2, rtol=1e-9)


@pytest.mark.parametrize("shape", [(64, 64, 1), (16, 24, 24, 1)])
def test_white_noise_ratio_is_the_share_of_frequency_bins_above_the_cutoff(shape):
  x = np.random.default_rng(1).normal(size=(8, *shape))
  rho = spectrum.normalised_radius(shape[:-1])
  expected = np.sum(rho > 0.5) / (rho.size - 1)  # flat spectrum: every non-DC bin carries equal energy
  got = spectrum.high_frequency_energy_ratio(x, 0.5)
  assert got.shape == (8,) and got.dtype == np.float64
  np.testing.assert_allclose(got.mean(), expected, atol=0.02)


@pytest.mark.parametrize("shape", [(48, 48, 3), (12, 24, 24, 1)])
def test_smoothing_removes_high_frequency_energy(shape):
  x = np.random.default_rng(2).normal(size=(4, *shape))
  sigma = (0,) + (1.5,) * (len(shape) - 1) + (0,)
  smooth = ndimage.gaussian_filter(x, sigma=sigma, mode="wrap")
  raw, blurred = (spectrum.high_frequency_energy_ratio(a, 0.5) for a in (x, smooth))
  assert np.all(blurred < 0.05 * raw)


def test_invariant_to_offset_and_scale_and_zero_for_constants():
  x = np.random.default_rng(3).uniform(size=(5, 20, 20, 3))
  r = spectrum.high_frequency_energy_ratio(x)
  np.testing.assert_allclose(spectrum.high_frequency_energy_ratio(3.0 * x - 7.0), r, rtol=1e-10)
  np.testing.assert_array_equal(spectrum.high_frequency_energy_ratio(np.full((2, 8, 8, 1), 0.3)), 0.0)


def test_radial_profile_of_white_noise_is_flat_and_finds_a_plane_wave():
  x = np.random.default_rng(4).normal(size=(16, 64, 64, 1))
  centres, prof = spectrum.radial_profile(x, num_bins=8)
  assert centres.shape == (8,) and prof.shape == (16, 8)
  np.testing.assert_allclose(centres, (np.arange(8) + 0.5) / 8)
  mean = prof.mean(0)
  np.testing.assert_allclose(mean / mean.mean(), 1.0, atol=0.1)  # white noise: equal power per bin
  _, wave = spectrum.radial_profile(plane_wave((64, 64), (16, 0)), num_bins=8)  # rho = 0.5 -> bin 3
  assert np.argmax(wave[0]) == 3 and np.all(np.delete(wave[0], 3) < 1e-12 * wave[0, 3])
  # Bins finer than the grid's frequency spacing (1/8 on 16 samples) hold no frequency: NaN, not 0.
  _, fine = spectrum.radial_profile(np.random.default_rng(5).normal(size=(1, 16, 16, 1)), num_bins=32)
  assert np.isnan(fine[0, 0]) and np.isfinite(fine[0, 3])


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    spectrum.high_frequency_energy_ratio(np.zeros((8, 8)))
  with pytest.raises(ValueError, match="hf_cutoff"):
    spectrum.high_frequency_energy_ratio(np.zeros((1, 8, 8, 1)), cutoff=-1.0)
