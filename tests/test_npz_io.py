""".npz reading without NumPy's thread-unsafe header parse racing (python/cpython#106905): exact arrays,
clear errors, one header parse at a time, and a grain pipeline with many read threads over many shards."""

import os
import threading
import time
import zipfile

import numpy as np
import pytest

from invcoss_jax import data, npz_io
from invcoss_jax.io_utils import atomic_savez

from conftest import make_cfg


def test_load_npz_equals_numpy_load_for_every_layout(tmp_path):
  rng = np.random.default_rng(0)
  arrays = dict(f32=rng.normal(size=(3, 4, 5)).astype(np.float32), u8=rng.integers(0, 255, (7, 2), np.uint8),
                i64=np.arange(6, dtype=np.int64), flag=np.array([True, False]), scalar=np.float64(2.5),
                empty=np.zeros((0, 3), np.float32), big_endian=np.arange(4, dtype=">i4"),
                fortran=np.asfortranarray(rng.normal(size=(4, 3))))
  for name, save in (("plain.npz", np.savez), ("packed.npz", np.savez_compressed)):
    path = tmp_path / name
    save(path, **arrays)
    got = npz_io.load_npz(path)
    with np.load(path) as ref:
      assert sorted(got) == sorted(ref.files)
      for k in ref.files:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        np.testing.assert_array_equal(got[k], ref[k])
    assert got["u8"].flags.writeable
    assert npz_io.npz_headers(path)["f32"] == ((3, 4, 5), np.dtype(np.float32))
    assert list(npz_io.load_npz(path, ["i64"])) == ["i64"]


def test_load_npz_errors_name_the_file(tmp_path):
  path = tmp_path / "a.npz"
  np.savez(path, images=np.zeros((2, 2)), names=np.array([{"a": 1}], dtype=object))
  with pytest.raises(KeyError, match=r"a\.npz: no array named 'labels' \(it has \['images', 'names'\]\)"):
    npz_io.load_npz(path, ["labels"])
  with pytest.raises(ValueError, match=r"a\.npz: array 'names' holds Python objects"):
    npz_io.load_npz(path, ["names"])
  big = tmp_path / "big.npz"
  np.savez(big, images=np.arange(100000, dtype=np.float32))
  cut = tmp_path / "cut.npz"
  cut.write_bytes(big.read_bytes()[:200000])
  with pytest.raises((EOFError, ValueError, zipfile.BadZipFile)):
    npz_io.load_npz(cut)
  with pytest.raises(data.DataError, match=r"cut\.npz"):
    data.image_io.load_npz_array(cut, "images")


def test_headers_are_parsed_one_at_a_time(tmp_path, monkeypatch):
  """The race is in NumPy's header parse: count how many threads are inside it at once."""
  paths = []
  for i in range(8):
    paths.append(tmp_path / f"s{i}.npz")
    np.savez(paths[-1], images=np.full((4, 3), i, np.float32), labels=np.arange(4))
  inside, most = [0], [0]
  guard = threading.Lock()
  real = np.lib.format.read_array_header_1_0

  def slow_parse(f, *a, **k):
    with guard:
      inside[0] += 1
      most[0] = max(most[0], inside[0])
    time.sleep(0.002)  # widen the window a race needs
    try:
      return real(f, *a, **k)
    finally:
      with guard:
        inside[0] -= 1

  monkeypatch.setattr(np.lib.format, "read_array_header_1_0", slow_parse)
  errors, results = [], []

  def work(k):
    try:
      for j in range(5):
        p = paths[(k + j) % len(paths)]
        results.append((p, npz_io.load_npz(p)["images"]))
        npz_io.npz_headers(p)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert most[0] == 1
  assert len(results) == 80 and all(np.all(a == int(os.path.basename(p)[1])) for p, a in results)


def test_many_read_threads_over_many_shards_read_every_example_exactly(tmp_path):
  """The npz source under 16 grain read threads, 40 shards and a 4-shard cache (so shards are reopened
  concurrently all the time): two epochs give every example exactly twice, unchanged."""
  rng = np.random.default_rng(1)
  shards = [rng.random((5, 8, 8, 3), dtype=np.float32) for _ in range(40)]
  for i, s in enumerate(shards):
    atomic_savez(tmp_path / "syn" / f"shard_{i:03d}.npz", images=s)
  c = make_cfg("folder", format="npz", modality="path", preprocessed=True, image_size=8,
               path=str(tmp_path / "syn"), read_threads=16, prefetch_buffer_size=64)
  it = data.make_train_iterator(c, global_batch_size=20, seed=0, process_index=0, process_count=1)
  seen = {}
  for _ in range(20):  # 400 examples = two epochs of 200
    for x in next(it)["image"]:
      seen[x.tobytes()] = seen.get(x.tobytes(), 0) + 1
  expect = {x.tobytes() for s in shards for x in s}
  assert set(seen) == expect and set(seen.values()) == {2}
