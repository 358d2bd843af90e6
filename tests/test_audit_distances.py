"""Chunked nearest-neighbour search against a brute-force NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax.audit import distances


def brute_force(q, r):
  q = q.reshape(q.shape[0], -1).astype(np.float64)
  r = r.reshape(r.shape[0], -1).astype(np.float64)
  d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1))
  return d.min(1), d.argmin(1)


@pytest.mark.parametrize("shape", [(6,), (5, 4, 3), (2, 3, 4, 2)])
@pytest.mark.parametrize("chunks", [dict(query_chunk=256, ref_chunk=1024), dict(query_chunk=7, ref_chunk=13),
                                    dict(query_chunk=1, ref_chunk=1)])
def test_matches_brute_force(shape, chunks):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(41, *shape)).astype(np.float32)
  r = rng.normal(size=(97, *shape)).astype(np.float32) * 1.3 + 0.2
  got = distances.nearest_neighbours(q, r, **chunks)
  ref_d, ref_i = brute_force(q, r)
  np.testing.assert_allclose(got.distance, ref_d, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.index, ref_i)
  assert got.distance.dtype == np.float32 and got.index.dtype == np.int64


def test_copies_have_distance_exactly_zero_despite_large_norms():
  # |q|^2 + |r|^2 - 2 q.r cancels catastrophically for large-norm copies; the exact re-scoring must not.
  rng = np.random.default_rng(1)
  r = (rng.normal(size=(50, 3000)) + 100.0).astype(np.float32)
  q = r[[4, 17, 49]].copy()
  got = distances.nearest_neighbours(q, r, ref_chunk=16)
  np.testing.assert_array_equal(got.distance, 0.0)
  np.testing.assert_array_equal(got.index, [4, 17, 49])


def test_streaming_over_reference_chunks_equals_one_pass():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(23, 8, 8, 1)).astype(np.float32)
  r = rng.normal(size=(70, 8, 8, 1)).astype(np.float32)
  ref_d, ref_i = brute_force(q, r)
  for queries in (q, jnp.asarray(q)):  # NumPy, or kept on the device across calls
    state = distances.init_neighbours(len(q))
    assert np.all(np.isinf(state.distance)) and np.all(state.index == -1)
    for start in range(0, len(r), 16):  # as the training split arrives, batch by batch
      state = distances.update_neighbours(state, queries, r[start:start + 16], ref_offset=start, query_chunk=5,
                                          ref_chunk=6)
    np.testing.assert_allclose(state.distance, ref_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.index, ref_i)


def test_memory_bound_shrinks_blocks_without_changing_the_result():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(9, 300)).astype(np.float32)
  r = rng.normal(size=(31, 300)).astype(np.float32)
  assert distances.block_rows(1024, 300, 900) == 3
  assert distances.block_rows(1024, 10**9, 900) == 1
  assert [distances.block_rows(1024, 8, 2**20, n) for n in (1, 5, 64, 65, 5000)] == [1, 8, 64, 128, 1024]
  tight = distances.nearest_neighbours(q, r, max_block_elements=900)
  ref_d, ref_i = brute_force(q, r)
  np.testing.assert_allclose(tight.distance, ref_d, rtol=1e-5)
  np.testing.assert_array_equal(tight.index, ref_i)


def test_ties_keep_the_earlier_reference():
  q = np.zeros((1, 4), np.float32)
  r = np.array([[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
  assert distances.nearest_neighbours(q, r, ref_chunk=2).index[0] == 1


def test_summary_statistics_match_numpy():
  d = np.random.default_rng(4).exponential(size=101)
  s = distances.summarize_distances(d)
  assert s["count"] == 101 and s["median"] == pytest.approx(np.median(d))
  assert s["p05"] == pytest.approx(np.quantile(d, 0.05)) and s["max"] == pytest.approx(d.max())
  assert distances.summarize_distances(np.array([])) == dict(count=0)


def test_bad_inputs_raise_clear_errors():
  q = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match="same sample shape"):
    distances.nearest_neighbours(q, np.zeros((5, 5), np.float32))
  with pytest.raises(ValueError, match="feature axis"):
    distances.nearest_neighbours(np.zeros((3,)), q)
  with pytest.raises(ValueError, match="neighbour state holds 2"):
    distances.update_neighbours(distances.init_neighbours(2), q, q, ref_offset=0)
