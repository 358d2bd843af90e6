"""`python -m invcoss_jax.main` end to end in a subprocess, and its flag errors."""

import json
import os
import subprocess
import sys

import pytest

from invcoss_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "invcoss_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_demo_preset_end_to_end(tmp_path):
  workdir = tmp_path / "xray_demo"
  p = _run("--config=configs/xray.py:demo", "--config.total_steps=3", "--config.seed=7",
           f"--workdir={workdir}")
  assert p.returncode == 0, p.stderr[-4000:]
  with open(workdir / "config.json") as f:
    config = json.load(f)
  assert config["total_steps"] == 3 and config["seed"] == 7 and config["data"]["name"] == "demo_xray"
  assert os.path.isdir(workdir / "checkpoints" / "3")
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  assert os.path.isfile(workdir / "statistics.npz"), os.listdir(workdir)  # the job ends with its statistics pass


def test_bad_config_path_is_named():
  p = _run("--config=configs/no_such_modality.py", "--workdir=/tmp/unused")
  assert p.returncode != 0
  assert "configs/no_such_modality.py" in p.stderr


def test_unknown_preset_is_named():
  p = _run("--config=configs/ct.py:dmeo", "--workdir=/tmp/unused")
  assert p.returncode != 0
  assert "unknown preset 'dmeo'" in p.stderr


@pytest.mark.parametrize("arg, want", [("configs/xray.py:demo", os.path.join("workdirs", "xray_demo")),
                                       ("configs/ct.py", os.path.join("workdirs", "ct"))])
def test_default_workdir(arg, want):
  assert main_lib.default_workdir(arg) == want


def test_loading_any_config_imports_no_jax_flax_or_grain():
  """Reading a config (what `--config=` does before a job starts) stays light: the package __init__s import
  their modules on first use."""
  code = ("import sys\nfrom invcoss_jax.defaults import load_config_file\n"
          "for spec in ('xray', 'ct', 'mri', 'path', 'report', 'continual.py:demo,report', 'retention', "
          "'evaluate.py:forgetting'):\n"
          "  load_config_file('configs/' + (spec if '.py' in spec else spec + '.py'))\n"
          "print(sorted(m for m in ('jax', 'flax', 'grain', 'optax', 'orbax.checkpoint', 'scipy') if m in sys.modules))")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.strip().splitlines()[-1] == "[]"
  from invcoss_jax import data, models
  assert models.MAE.__name__ == "MAE" and data.text_io.__name__ == "invcoss_jax.data.text_io"  # on first use
  with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
    data.no_such_name  # noqa: B018
