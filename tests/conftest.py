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


def tiny_continual_config(method: str, xray_path: str | None = None):
  """X-ray then CT on the demo data, a tiny ViT, 2 steps per stage: the continual job of every method in a
  test (tests/test_continual_job.py, tests/test_continual_methods.py)."""
  from invcoss_jax.defaults import load_config_file  # pylint: disable=g-import-not-at-top  (after the env set-up above)
  c = load_config_file(f"configs/continual.py:demo,{method}")
  c.continual.order = ("xray", "ct")
  c.model.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
  for m in c.continual.datasets:
    d = c.continual.datasets[m]
    d.image_size, d.volume_shape = 16, (8, 16, 16)
    d.ct.target_spacing = ()  # the file's 3 mm grid: no resampling in a test
  if xray_path:  # a site copy of the demo X-rays the test may delete
    x = c.continual.datasets.xray
    x.name, x.format, x.path, x.modality = "folder", "npz", xray_path, "xray"
  c.total_steps = 2
  c.train.global_batch_size = 4
  c.checkpoint.every_steps = 100
  c.logging.log_every_steps = 1
  c.continual.statistics_after_stage = method == "invcoss"
  c.continual.synthesize_last_stage = False  # nothing reads the last stage's synthetic set here
  c.inversion.stats_batch_size = 128
  c.inversion.num_samples = 8
  # Direct pixel optimisation (Table 2's "w/o G"): the generators have their own tests; this one is about the
  # sequence, and compiles faster.
  c.inversion.generator = "none"
  if method == "noise":  # the control replays a generator's output at initialisation: it needs a generator
    c.inversion.generator = "invunet"
    c.inversion.invunet.channels = (4, 8)
  for s in (c.inversion.schedule_2d, c.inversion.schedule_3d):
    s.batch_size, s.steps, s.init_steps, s.latent_dim = 4, 2, 2, 8
  c.continual.kmeans.batch_size = 128
  c.continual.ewc.fisher_num_examples = 4
  c.continual.ewc.fisher_batch_size = 4
  c.continual.cassle.hidden_dim = 16
  c.continual.packnet.retrain_fraction = 0.5  # one retraining step after pruning
  return c
