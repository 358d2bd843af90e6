"""SIGKILL at chosen points (invcoss_jax.faults), restart on the same workdir: the same results as an
uninterrupted run, and no half-written file read as whole or left behind.

Each test runs `python -m invcoss_jax.main` in subprocesses: once straight through, then as a chain of runs,
each killed at the next point of the job (a run must die there: exit -9) and restarted, the last one
finishing. The subprocesses use the test session's persistent compilation cache (tests/conftest.py), with every
computation cached: the restarts (and the other tests compiling the same steps) load what an earlier run compiled.

The uninterrupted runs are fresh interpreters. The runs of a chain are forked from a server process that
imported the jobs' modules once (JAX, TensorFlow, scikit-learn...: about 6 s of each run's 8 to 15 s here), as
`multiprocessing`'s forkserver does: each is a new process that has started no JAX backend, thread or file yet,
given its own environment (INVCOSS_KILL_AT), working directory, stdout and stderr, and runs the entry point as
`python -m` does (`runpy`, `__main__`, `sys.exit`), so it ends, is killed and leaves its workdir exactly as a
fresh one would. A fresh interpreter draws its own hash seed and NumPy seed; each forked run reseeds NumPy's
global generator, and the references are fresh interpreters, so results that depended on either would still
differ between the two sides of a comparison.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from invcoss_jax import faults, npz_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modules every job of this file imports (not invcoss_jax.main itself: each run defines its absl flags).
_PRELOAD = ("absl.app", "ml_collections.config_flags", "invcoss_jax.jobs.pretrain", "invcoss_jax.jobs.evaluate",
            "invcoss_jax.jobs.retention", "invcoss_jax.jobs.audit")

# The fork server: imports _PRELOAD, says "ready", then per request line (JSON: args, env, cwd, stdout and stderr
# files) forks a run and answers {"pid"} at once and {"returncode"} (negative: the signal) when it has ended.
_SERVER = r"""
import importlib, json, os, runpy, sys
for name in sys.argv[1:]:
  importlib.import_module(name)
from jax._src import xla_bridge
assert not getattr(xla_bridge, "_backends", None), "a JAX backend was started before the fork"
print("ready", flush=True)
for line in sys.stdin:
  req = json.loads(line)
  sys.stdout.flush(); sys.stderr.flush()
  pid = os.fork()
  if pid == 0:  # the run: it never returns to this loop (runpy ends in sys.exit or an exception)
    os.environ.clear(); os.environ.update(req["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
      f = os.open(path, flags, 0o644); os.dup2(f, fd); os.close(f)
    os.chdir(req["cwd"])
    import numpy
    numpy.random.seed()  # a fresh interpreter's global generator (the random module reseeds itself at a fork)
    sys.argv = ["invcoss_jax.main"] + req["args"]
    runpy.run_module("invcoss_jax.main", run_name="__main__", alter_sys=True)
    sys.exit(0)
  print(json.dumps({"pid": pid}), flush=True)
  _, status = os.waitpid(pid, 0)
  rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
  print(json.dumps({"returncode": rc}), flush=True)
"""


class ForkServer:
  """Runs `python -m invcoss_jax.main ARGS` as processes forked from one that imported the jobs once."""

  def __init__(self, env, logdir):
    self.logdir, self.count = str(logdir), 0
    self.log = os.path.join(self.logdir, "server.log")
    with open(self.log, "w") as err:
      self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, *_PRELOAD], cwd=REPO, env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    self.lines = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    assert self._next(600) == "ready", self._log_tail()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.put(line.strip())
    self.lines.put(None)  # the server ended

  def _next(self, timeout):
    line = self.lines.get(timeout=timeout)
    if line is None:
      raise RuntimeError(f"the fork server ended (exit {self.proc.poll()}):\n{self._log_tail()}")
    return line

  def _log_tail(self):
    with open(self.log) as f:
      return f.read()[-3000:]

  def run(self, args, env, timeout):
    self.count += 1
    out, err = (os.path.join(self.logdir, f"run_{self.count}.{k}") for k in ("out", "err"))
    self.proc.stdin.write(json.dumps(dict(args=list(args), env=env, cwd=REPO, stdout=out, stderr=err)) + "\n")
    self.proc.stdin.flush()
    pid = json.loads(self._next(60))["pid"]
    try:
      rc = json.loads(self._next(timeout))["returncode"]
    except queue.Empty:
      os.kill(pid, signal.SIGKILL)
      self._next(60)
      raise subprocess.TimeoutExpired(["invcoss_jax.main", *args], timeout) from None
    with open(out) as o, open(err) as e:
      return subprocess.CompletedProcess(["invcoss_jax.main", *args], rc, o.read(), e.read())

  def close(self):
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


@pytest.fixture(scope="module")
def run_main(tmp_path_factory):
  """run(args, kill_at=None, fresh=False): one run of the entry point; `fresh`: in a new interpreter (the
  uninterrupted references), else forked from the server. A run with `kill_at` must die there (SIGKILL)."""
  # The session's cache (conftest sets JAX_COMPILATION_CACHE_DIR), not one of this module's own: the straight runs
  # then load what the in-process tests of the same jobs compiled (and a CI machine's earlier runs), instead of
  # compiling every step, inversion and measurement again from nothing.
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop(faults.ENV, None)
  env.pop(faults.DISK_FULL_ENV, None)
  server = None

  def run(args, kill_at=None, fresh=False, timeout=600):
    nonlocal server
    run_env = dict(env, **({faults.ENV: kill_at} if kill_at else {}))
    if fresh:
      p = subprocess.run([sys.executable, "-m", "invcoss_jax.main", *args], cwd=REPO, env=run_env,
                         capture_output=True, text=True, timeout=timeout)
    else:
      server = server or ForkServer(env, tmp_path_factory.mktemp("fork_server"))
      p = server.run(args, run_env, timeout)
    if kill_at:
      assert p.returncode == -signal.SIGKILL, (f"the run was to be killed at {kill_at!r}, exit {p.returncode}:\n"
                                               + p.stderr[-3000:])
    else:
      assert p.returncode == 0, p.stderr[-4000:]
    return p

  yield run
  if server is not None:
    server.close()


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
  run_main(args + [f"--workdir={tmp_path / 'straight'}"], fresh=True)
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
  run_main(EVAL + [f"--workdir={tmp_path / 'straight'}"], fresh=True)
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
  run_main(["--config=configs/retention.py:tiny", "--config.retention.seeds=(0,)", f"--workdir={workdir}"],
           fresh=True)
  return workdir


def test_audit_killed_while_writing_its_outputs_audits_again(run_main, retention_straight, tmp_path):
  stage = retention_straight / "runs" / "seed_0" / "invcoss" / "stage_1_xray"
  args = ["--config=configs/xray.py:demo", "--config.mode=audit", f"--config.init_from={stage}",
          f"--config.audit.synthetic_path={stage / 'synthetic'}", "--config.audit.num_bootstrap=50",
          "--config.audit.max_members=64",
          # The judges at test sizes: their outputs are in audit.json, which must come out identical.
          "--config.audit.judges.folds=2", "--config.audit.judges.cnn_steps=10",
          "--config.audit.judges.judge_net_steps=10"]
  killed = tmp_path / "killed"
  run_main(args + [f"--workdir={killed}"], kill_at="atomic:audit.json", fresh=True)
  # The run (a fresh interpreter) died with audit.json complete in its temporary file, not renamed into place:
  # that file is what the uninterrupted audit writes (the point is reached only after every number and figure is
  # made, in a fresh workdir, as a straight run's), so it is the reference, without a third run of the audit.
  assert not (killed / "audit.json").exists()
  tmp = [n for n in os.listdir(killed) if n.startswith(".tmp-audit.json-")]
  assert len(tmp) == 1, os.listdir(killed)
  straight = json.loads((killed / tmp[0]).read_text())
  p = run_main(args + [f"--workdir={killed}"])
  assert "auditing again from the start" in p.stderr
  again = json.loads((killed / "audit.json").read_text())
  straight.pop("workdir"), again.pop("workdir")
  assert again == straight
  assert not leftovers(killed)


def test_retention_benchmark_killed_at_every_kind_of_point(run_main, retention_straight, tmp_path):
  """Continual runs of seqssl, er and invcoss (stage 1 shared) and their measurements, killed mid-stage,
  between a stage's end and its stage_info.json, while a measurement, the real buffer and the inversion are
  being written, and while the report is written.

  No kill at `atomic:synthetic` (the synthetic shards before their folder swap): it is the same writer as
  `atomic:buffer` (npz_io.write_shards, whose stale temporary folder the restart must remove) and the same
  recovery as `inversion_batch:0` (the stage end, not marked done, inverts again from the start), both killed
  here; the synthetic shards of the killed run are still compared with the straight run's below."""
  args = ["--config=configs/retention.py:tiny", "--config.retention.seeds=(0,)"]
  killed = tmp_path / "killed"
  chain(run_main, args, killed, [
      "train_step:stage_1_xray:3",  # resumes from the step-2 checkpoint
      "stage_end:stage_1_xray",  # trained and statistics written, not marked done
      "atomic:stage_1_xray.json",  # a measurement of the model after stage 1
      "atomic:buffer",  # er's real buffer shards, before the folder swap
      "inversion_batch:0",  # invcoss inverting stage 1: the inversion starts again
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
