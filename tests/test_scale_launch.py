"""launch/: the multi-process entry point. Two CPU processes (2 simulated devices each) pre-train on the demo
X-rays through `launch/distributed_main.py`, as SLURM or a TPU pod would start them: each process reads its own
share of the data, every process writes its part of each checkpoint, and a job restarted from a checkpoint ends
with exactly the parameters of an uninterrupted one. The launch scripts parse."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _load_launcher():
  spec = importlib.util.spec_from_file_location("distributed_main", os.path.join(LAUNCH, "distributed_main.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_initialize_arguments_from_the_environment():
  f = _load_launcher().initialize_arguments
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NTASKS="16", SLURM_PROCID="3",
               SLURM_LOCALID="3")
  assert f("slurm", slurm) == {"cluster_detection_method": "slurm"}
  assert f("auto", slurm) == {"cluster_detection_method": "slurm"}
  assert f("auto", dict(slurm, SLURM_NTASKS="1")) is None  # a one-task allocation is a single process
  explicit = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="2")
  assert f("env", explicit) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
  assert f("auto", explicit) == f("env", explicit)
  assert f("auto", {}) is None and f("none", slurm) is None and f("tpu", {}) == {}
  with pytest.raises(ValueError, match=r"needs SLURM's step variables \['SLURM_STEP_NODELIST'"):
    f("slurm", {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"})
  with pytest.raises(ValueError, match=r"needs the environment variables \['JAX_PROCESS_ID'\]"):
    f("env", {k: v for k, v in explicit.items() if k != "JAX_PROCESS_ID"})


@pytest.mark.parametrize("script", ["single_host_gpu.sh", "tpu_pod.sh", "slurm_multinode.sbatch"])
def test_launch_scripts_parse_and_call_the_entry_point(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  assert "invcoss_jax.main" in text or "launch/distributed_main.py" in text


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _xla_flags(num_devices: int) -> str:
  """This process's XLA flags (conftest's compile settings) with another simulated device count."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}"])


def _run_two_processes(workdir, total_steps):
  port = _free_port()
  flags = ["--distributed=env", "--config=configs/xray.py:demo", f"--workdir={workdir}",
           f"--config.total_steps={total_steps}", "--config.train.stats_after_pretrain=False",
           "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
           "--config.logging.log_every_steps=1", "--config.logging.image_every_steps=0",
           # A constant learning rate (no warm-up, cosine from the peak to the peak), so runs of different
           # lengths take identical steps and a resumed run can be compared with an uninterrupted one.
           "--config.train.warmup_epochs=0", "--config.train.min_lr=0.0015"]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(2),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, os.path.join(LAUNCH, "distributed_main.py"), *flags],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
  return logs


def test_two_processes_checkpoint_together_and_resume_exactly(tmp_path):
  from invcoss_jax.train import checkpoint as ckpt_lib

  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  logs = _run_two_processes(straight, 4)
  assert "process 0 of 2: 2 local / 4 global devices (cpu)" in logs[0]
  assert "process 1 of 2: 2 local / 4 global devices (cpu)" in logs[1]
  step_dir = straight / "checkpoints" / "4"
  # Each process saved its own data-iterator position and its own part of the arrays.
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data_iter"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir / "state"))

  # A job preempted after step 2 (its later checkpoint never written) and started again.
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  logs = _run_two_processes(resumed, 4)
  assert all("resuming at step 2" in log for log in logs)
  with open(resumed / "config.json") as f:
    assert json.load(f)["total_steps"] == 4

  _, _, p_straight = ckpt_lib.load_trained_stage(straight)
  _, _, p_resumed = ckpt_lib.load_trained_stage(resumed)
  _, _, p_two = ckpt_lib.load_trained_stage(resumed, step=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
               p_resumed, p_straight)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), p_resumed, p_two)
  assert any(jax.tree.leaves(moved))
