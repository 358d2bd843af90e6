"""Reading 3D volumes (NIfTI with nibabel, DICOM series and slices with pydicom) as (D, H, W) arrays.

Every volume comes back in one orientation: NIfTI images are reoriented to LPS (the DICOM patient
frame), then laid out as (D, H, W) = (S, P, L): depth runs inferior -> superior, rows anterior ->
posterior, columns right -> left, so an axial slice looks as radiologists display it. DICOM series are
stacked along their slice normal in the stored in-plane orientation. Spacing is returned in the same
(D, H, W) order, in mm.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from invcoss_jax.data.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom")
_LPS = ("L", "P", "S")


@dataclasses.dataclass(frozen=True)
class VolumeHeader:
  """What indexing needs without reading voxels: the (D, H, W) shape and spacing of a volume."""
  path: str
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]


def strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
  low = name.lower()
  for s in suffixes:
    if low.endswith(s):
      return name[:-len(s)]
  return os.path.splitext(name)[0]


def _read_errors():
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  return (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError)


def _as_3d_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The 3D shape of `shape`, dropping trailing singleton axes; 2D or true 4D+ is an error."""
  shape = tuple(int(s) for s in shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise DataError(path, f"expected a 3D volume, got a {len(shape)}D array of shape {shape}"
                    + (" (a 4D series: extract one 3D volume first)" if len(shape) == 4 else ""))
  return shape


def _nifti_orientation(img):
  """(transform from the file's axes to LPS, permutation of LPS axes to (D, H, W) = (z, y, x))."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  ornt = nib.orientations.io_orientation(img.affine)
  return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(_LPS))


def nifti_header(path: str | os.PathLike) -> VolumeHeader:
  """Shape and spacing of a NIfTI volume in (D, H, W) order, from the header alone."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    img = nib.load(path)
    shape3 = _as_3d_shape(path, img.shape)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    transform = _nifti_orientation(img)
  except DataError:
    raise
  except _read_errors() as e:
    raise DataError(path, f"cannot read the NIfTI header ({type(e).__name__}: {e}); expected a "
                    "readable .nii or .nii.gz file") from e
  # transform[i, 0] is the LPS axis that file axis i becomes.
  lps_shape = [0, 0, 0]
  lps_spacing = [0.0, 0.0, 0.0]
  for i in range(3):
    lps_shape[int(transform[i, 0])] = shape3[i]
    lps_spacing[int(transform[i, 0])] = zooms[i]
  if not all(s > 0 for s in lps_spacing):
    raise DataError(path, f"expected positive voxel sizes in the header, got {zooms}")
  return VolumeHeader(path, (lps_shape[2], lps_shape[1], lps_shape[0]),
                      (lps_spacing[2], lps_spacing[1], lps_spacing[0]))


def read_nifti(path: str | os.PathLike, *, dtype=np.float32) -> tuple[np.ndarray, tuple[float, float, float]]:
  """A NIfTI volume as a (D, H, W) array (scaled by the header's slope/intercept) and its spacing."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  header = nifti_header(path)
  try:
    img = nib.load(path)
    data = np.asarray(img.dataobj)
  except _read_errors() as e:
    raise DataError(path, f"cannot read the voxel data ({type(e).__name__}: {e}); expected a "
                    "complete .nii or .nii.gz file (truncated or corrupt?)") from e
  data = data.reshape(_as_3d_shape(path, data.shape))
  data = nib.orientations.apply_orientation(data, _nifti_orientation(img))
  data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)), dtype=dtype)
  return data, header.spacing


def _dicom_errors():
  import pydicom  # pylint: disable=g-import-not-at-top
  return (OSError, EOFError, ValueError, KeyError, AttributeError, TypeError,
          pydicom.errors.InvalidDicomError)


def _dicom_rescaled(ds, path: str) -> np.ndarray:
  import pydicom.pixels  # pylint: disable=g-import-not-at-top
  try:
    arr = ds.pixel_array
  except _dicom_errors() + (RuntimeError, NotImplementedError) as e:
    raise DataError(path, f"cannot decode the DICOM pixel data ({type(e).__name__}: {e}); expected "
                    "complete, decodable pixel data") from e
  if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
    raise DataError(path, f"expected a single-frame DICOM slice, got {arr.shape[0]} frames")
  # Modality LUT (RescaleSlope/Intercept): CT values in Hounsfield units.
  return pydicom.pixels.apply_rescale(arr, ds).astype(np.float32)


def read_dicom_slice(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float]]:
  """One DICOM slice as an (H, W) float32 array after the modality LUT (CT: Hounsfield units;
  MONOCHROME1 inverted so that high values are bright), and its (row, col) spacing."""
  import pydicom  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    ds = pydicom.dcmread(path)
  except _dicom_errors() as e:
    raise DataError(path, f"cannot read the DICOM file ({type(e).__name__}: {e}); expected a "
                    "readable DICOM slice") from e
  arr = _dicom_rescaled(ds, path)
  if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
    arr = (arr.min() + arr.max()) - arr  # MONOCHROME1 shows low values bright (some X-rays)
  spacing = tuple(float(s) for s in ds.get("PixelSpacing", (1.0, 1.0)))
  return arr, (spacing[0], spacing[1])


def list_dicom_files(folder: str) -> list[str]:
  """DICOM files directly inside `folder` (by suffix, or any file without one that has the DICM magic)."""
  out = []
  for name in sorted(os.listdir(folder)):
    p = os.path.join(folder, name)
    if not os.path.isfile(p) or name.startswith("."):
      continue
    if name.lower().endswith(DICOM_SUFFIXES):
      out.append(p)
    elif "." not in name:
      with open(p, "rb") as f:
        f.seek(128)
        if f.read(4) == b"DICM":
          out.append(p)
  return out


def _slice_geometry(ds, path: str):
  """(position along the slice normal, instance number) used to order a series."""
  orient = ds.get("ImageOrientationPatient")
  pos = ds.get("ImagePositionPatient")
  inst = int(ds.get("InstanceNumber", 0) or 0)
  if orient is None or pos is None:
    return None, inst
  row, col = np.asarray(orient[:3], float), np.asarray(orient[3:], float)
  return float(np.dot(np.cross(row, col), np.asarray(pos, float))), inst


# What tells series apart, besides SeriesInstanceUID (absent from some anonymised or converted exports):
# slices of one series share all of these.
_SERIES_TAGS = ("SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber", "Modality", "ImageOrientationPatient",
                "Rows", "Columns", "PixelSpacing")


def _series_key(ds, path: str) -> tuple:
  """The values of `_SERIES_TAGS` of a slice (orientation and spacing rounded, so float noise does not split)."""
  out = []
  for tag in _SERIES_TAGS:
    value = ds.get(tag)
    if tag in ("Rows", "Columns"):
      if value is None:
        raise DataError(path, f"no {tag} in the DICOM header: expected an image slice")
      value = int(value)
    elif tag in ("ImageOrientationPatient", "PixelSpacing"):
      value = None if value is None else tuple(round(float(v), 3) for v in value)
    elif value is not None:
      value = str(value)
    out.append(value)
  return tuple(out)


def _mixed_series(folder: str, keys: list[tuple], files: list[str]) -> DataError:
  """The error for slices of several series in one folder, saying which tags differ and where."""
  groups: dict[tuple, list[str]] = {}
  for k, f in zip(keys, files):
    groups.setdefault(k, []).append(f)
  differ = [t for i, t in enumerate(_SERIES_TAGS) if len({k[i] for k in groups}) > 1]
  tag = differ[0]
  i = _SERIES_TAGS.index(tag)
  firsts = sorted(groups.items(), key=lambda kv: kv[1][0])
  values = " and ".join(str(k[i]) for k, _ in firsts[:3]) + (" ..." if len(firsts) > 3 else "")
  examples = ", ".join(os.path.basename(fs[0]) for _, fs in firsts[:3])
  return DataError(folder, f"expected one series per folder, found {len(groups)} series told apart by "
                   f"{'/'.join(differ)} ({tag} {values}; e.g. {examples}): put each series in its own folder")


def dicom_series_header(folder: str | os.PathLike) -> tuple[VolumeHeader, list[str]]:
  """Shape/spacing of the series in `folder` and its files ordered along the slice normal.

  The slices must be one series: they agree on SeriesInstanceUID and on the tags that tell series apart
  without it (study, series number, modality, orientation, size, pixel spacing); without a
  SeriesInstanceUID, two slices with one InstanceNumber are taken as two interleaved series too. Several
  series in one folder are refused (a DataError saying which tags differ), never merged into one volume.
  """
  import pydicom  # pylint: disable=g-import-not-at-top
  folder = os.fspath(folder)
  files = list_dicom_files(folder)
  if not files:
    raise DataError(folder, "expected a folder of DICOM slices (.dcm) forming one series, found none")
  geometry, series, instances = [], [], {}
  first = None
  for f in files:
    try:
      ds = pydicom.dcmread(f, stop_before_pixels=True)
      key = _series_key(ds, f)
      geometry.append(_slice_geometry(ds, f) + (f,))
    except DataError:
      raise
    except _dicom_errors() as e:
      raise DataError(f, f"cannot read the DICOM header ({type(e).__name__}: {e}); expected a "
                      "readable DICOM slice") from e
    first = first or ds
    series.append(key)
    inst = geometry[-1][1]
    if inst and key[0] is None:
      instances.setdefault(inst, []).append(f)
  if len(set(series)) > 1:
    raise _mixed_series(folder, series, files)
  repeated = sorted((fs, inst) for inst, fs in instances.items() if len(fs) > 1)
  if repeated:
    names, inst = ", ".join(os.path.basename(f) for f in repeated[0][0][:3]), repeated[0][1]
    raise DataError(folder, f"expected one series per folder, found 2 or more interleaved: InstanceNumber {inst} "
                    f"is held by {names}, and the slices have no SeriesInstanceUID to tell them apart: put each "
                    "series in its own folder")
  keys = geometry
  if all(k[0] is not None for k in keys):
    keys.sort(key=lambda k: (k[0], k[1]))
    positions = np.asarray([k[0] for k in keys])
    steps = np.diff(positions)
    if len(steps) and np.any(np.abs(steps) < 1e-6):
      raise DataError(folder, "expected one slice per position, found slices at the same position")
    dz = float(np.median(np.abs(steps))) if len(steps) else float(first.get("SliceThickness", 1.0))
  else:
    keys.sort(key=lambda k: k[1])
    dz = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
  rows, cols = series[0][_SERIES_TAGS.index("Rows")], series[0][_SERIES_TAGS.index("Columns")]
  ps = [float(s) for s in first.get("PixelSpacing", (1.0, 1.0))]
  header = VolumeHeader(folder, (len(files), rows, cols), (dz, ps[0], ps[1]))
  return header, [k[2] for k in keys]


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
  """A DICOM series (one folder) as a (D, H, W) float32 array in modality units and its spacing."""
  header, files = dicom_series_header(folder)
  vol = np.stack([read_dicom_slice(f)[0] for f in files])
  return vol, header.spacing
