"""SIGKILL at chosen points (invcoss_jax.faults), restart on the same workdir: the same results as an
uninterrupted run, and no half-written file read as whole or left behind.

Each test runs `python -m invcoss_jax.main` in subprocesses: once straight through, then as a chain of runs,
each killed at the next point of the job (a run must die there: exit -9) and restarted, the last one
finishing. A persistent compilation cache shared by the subprocesses keeps the restarts fast.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from invcoss_jax import faults, npz_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_main(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))

  def run(args, kill_at=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop(faults.ENV, None)
    if kill_at:
      env[faults.ENV] = kill_at
    p = subprocess.run([sys.executable, "-m", "invcoss_jax.main", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if kill_at:
      assert p.returncode == -signal.SIGKILL, (f"the run was to be killed at {kill_at!r}, exit {p.returncode}:\n"
                                               + p.stderr[-3000:])
    else:
      assert p.returncode == 0, p.stderr[-4000:]
    return p

  return run


def chain(run_main, args, workdir, points):
  for point in points:
    run_main(args + [f"--workdir={workdir}"], kill_at=point)
  return run_main(args + [f"--workdir={workdir}"])


def leftovers(root):
  """Temporary files or folders of atomic writes (.tmp-*, .old-*) anywhere under `root`."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    out += [os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith((".tmp-", ".old-"))]
  return out


def final_params(workdir):
  from invcoss_jax.train import checkpoint as ckpt_lib
  return ckpt_lib.load_trained_stage(workdir)[2]


def assert_trees_equal(a, b):
  import jax
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pretraining_killed_mid_checkpoint_and_mid_statistics(run_main, tmp_path):
  args = ["--config=configs/xray.py:demo", "--config.total_steps=6", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.async_save=True", "--config.seed=3"]
  run_main(args + [f"--workdir={tmp_path / 'straight'}"])
  killed = tmp_path / "killed"
  # An asynchronous checkpoint of step 4 is being written when the first run dies; the second dies with
  # the statistics fully written to their temporary file, not yet renamed.
  chain(run_main, args, killed, ["checkpoint:4", "atomic:statistics.npz"])
  assert_trees_equal(final_params(killed), final_params(tmp_path / "straight"))
  a, b = (npz_io.load_npz(d / "statistics.npz") for d in (tmp_path / "straight", killed))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not leftovers(killed)


EVAL = ["--config=configs/evaluate.py:pneumonia", "--config.model.width=64", "--config.model.depth=2",
        "--config.model.num_heads=4", "--config.evaluate.seeds=(0,1)", "--config.evaluate.tasks.pneumonia.steps=12",
        "--config.evaluate.tasks.pneumonia.eval_every=6", "--config.evaluate.tasks.pneumonia.data.image_size=32"]


def test_evaluation_killed_mid_seed_and_while_writing_results(run_main, tmp_path):
  """Seed 0 finished and kept; seed 1 cut at step 8 starts again (said in the log); a kill while the report
  is written leaves the old report or none, never half of one."""
  run_main(EVAL + [f"--workdir={tmp_path / 'straight'}"])
  killed = tmp_path / "killed"
  run_main(EVAL + [f"--workdir={killed}"], kill_at="finetune_step:pneumonia:1:8")
  assert (killed / "seed_0" / "metrics.json").is_file() and not (killed / "seed_1" / "metrics.json").exists()
  run_main(EVAL + [f"--workdir={killed}"], kill_at="atomic:results.json")
  p = run_main(EVAL + [f"--workdir={killed}"])
  assert "seed 0 already evaluated" in p.stderr
  a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "straight", killed))
  a.pop("workdir", None), b.pop("workdir", None)
  assert a == b
  assert not leftovers(killed)


@pytest.fixture(scope="module")
def retention_straight(run_main, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("retention") / "straight"
  run_main(["--config=configs/retention.py:tiny", "--config.retention.seeds=(0,)", f"--workdir={workdir}"])
  return workdir


def test_audit_killed_while_writing_its_outputs_audits_again(run_main, retention_straight, tmp_path):
  stage = retention_straight / "runs" / "seed_0" / "invcoss" / "stage_1_xray"
  args = ["--config=configs/xray.py:demo", "--config.mode=audit", f"--config.init_from={stage}",
          f"--config.audit.synthetic_path={stage / 'synthetic'}", "--config.audit.num_bootstrap=50",
          "--config.audit.max_members=64",
          # The judges at test sizes: their outputs are in audit.json, which must come out identical.
          "--config.audit.judges.folds=2", "--config.audit.judges.cnn_steps=10",
          "--config.audit.judges.judge_net_steps=10"]
  run_main(args + [f"--workdir={tmp_path / 'straight'}"])
  killed = tmp_path / "killed"
  run_main(args + [f"--workdir={killed}"], kill_at="atomic:audit.json")
  p = run_main(args + [f"--workdir={killed}"])
  assert "auditing again from the start" in p.stderr
  a, b = (json.loads((d / "audit.json").read_text()) for d in (tmp_path / "straight", killed))
  a.pop("workdir"), b.pop("workdir")
  assert a == b
  assert not leftovers(killed)


def test_retention_benchmark_killed_at_every_kind_of_point(run_main, retention_straight, tmp_path):
  """Continual runs of seqssl, er and invcoss (stage 1 shared) and their measurements, killed mid-stage,
  between a stage's end and its stage_info.json, while a measurement, the real buffer, the inversion and the
  synthetic shards are being written, and while the report is written."""
  args = ["--config=configs/retention.py:tiny", "--config.retention.seeds=(0,)"]
  killed = tmp_path / "killed"
  chain(run_main, args, killed, [
      "train_step:stage_1_xray:3",  # resumes from the step-2 checkpoint
      "stage_end:stage_1_xray",  # trained and statistics written, not marked done
      "atomic:stage_1_xray.json",  # a measurement of the model after stage 1
      "atomic:buffer",  # er's real buffer shards, before the folder swap
      "inversion_batch:0",  # invcoss inverting stage 1: the inversion starts again
      "atomic:synthetic",  # the synthetic shards, before the folder swap
      "train_step:stage_2_path:3",  # invcoss's second stage, with synthetic replay
      "atomic:retention.json",  # the report
  ])
  straight = json.loads((retention_straight / "retention.json").read_text())
  assert json.loads((killed / "retention.json").read_text()) == straight
  for m in ("seqssl", "er", "invcoss"):
    assert_trees_equal(final_params(killed / "runs" / "seed_0" / m / "stage_2_path"),
                       final_params(retention_straight / "runs" / "seed_0" / m / "stage_2_path"))
  syn = [npz_io.load_npz(d / "runs" / "seed_0" / "invcoss" / "stage_1_xray" / "synthetic" / "shard_00000.npz")
         for d in (retention_straight, killed)]
  np.testing.assert_array_equal(syn[0]["images"], syn[1]["images"])
  assert not leftovers(killed)
