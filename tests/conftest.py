"""Test setup shared by every test file.

Four simulated CPU devices are configured before JAX is imported so that sharding tests can build
meshes of 1, 2 or 4 devices in one process; single-device tests use `jax.devices()[:1]`.
"""

import os
import pathlib

# Backend optimisation level 0 halves XLA's CPU compile time, which dominates these tiny-model tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
# Identical computations compiled by different tests (and by subprocess tests) are compiled once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                "invcoss_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
  """../shared/data next to the checkout (CI has it), or $INVCOSS_SHARED_DATA; None if absent."""
  env = os.environ.get("INVCOSS_SHARED_DATA")
  candidates = [pathlib.Path(env)] if env else []
  candidates.append(REPO_ROOT.parent / "shared" / "data")
  for c in candidates:
    if c.is_dir() and (c / "README.md").exists():
      return c
  return None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real-data folder; tests that need files beyond the embedded demo corpus skip without it."""
  d = shared_data_dir()
  if d is None:
    pytest.skip("../shared/data (or $INVCOSS_SHARED_DATA) is absent: this test needs the real files "
                "beyond the embedded demo corpus; CI provides them.")
  return d


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  d = tmp_path / "workdir"
  d.mkdir()
  return d


def make_cfg(name, **dotted):
  """`config.data` for dataset `name` with dotted overrides, e.g. `make_cfg("folder", **{"ct.hu_min": -500})`."""
  from invcoss_jax import data

  c = data.data_config()
  c.name = name
  c.update_from_flattened_dict(dotted)
  return c
