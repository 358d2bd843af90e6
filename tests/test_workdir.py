"""A workdir remembers what it holds: another mode, modality, model, sequence or task is refused before
anything is written; file-system errors are one clear line."""

import errno
import json
import os
import subprocess
import sys

import pytest

from invcoss_jax import faults, jobs
from invcoss_jax import workdir as workdir_lib
from invcoss_jax.defaults import load_config_file
from invcoss_jax.workdir import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(spec, **overrides):
  c = load_config_file(os.path.join(REPO, spec))
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def snapshot(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_another_modality_mode_or_model_is_refused_before_anything_is_written(tmp_path):
  w = tmp_path / "xray"
  workdir_lib.claim(w, cfg("configs/xray.py:demo"))
  assert json.loads((w / "workdir.json").read_text())["modality"] == "xray"
  workdir_lib.claim(w, cfg("configs/xray.py:demo", total_steps=500))  # the same run, longer: resumes
  before = snapshot(w)
  with pytest.raises(WorkdirError, match=r"belongs to another run \(mode=pretrain, modality=xray, model=\w+\): its "
                                         r"modality is 'xray' where this run's is 'path'"):
    jobs.run(cfg("configs/path.py:demo"), w)
  with pytest.raises(WorkdirError, match=r"it holds a 'pretrain' run and config.mode='evaluate' would write"):
    jobs.run(cfg("configs/evaluate.py", init_from=str(w)), w)
  with pytest.raises(WorkdirError, match=r"its model differs \(width: 64 -> 96\)"):
    jobs.run(cfg("configs/xray.py:demo", **{"model.width": 96}), w)
  assert snapshot(w) == before
  # stats and invert add to a stage's workdir and leave it the stage's.
  workdir_lib.claim(w, cfg("configs/xray.py:demo", mode="stats"))
  workdir_lib.claim(w, cfg("configs/xray.py:demo", mode="invert", init_from=str(w)))
  assert json.loads((w / "workdir.json").read_text())["mode"] == "pretrain"
  with pytest.raises(WorkdirError, match="its model differs"):
    workdir_lib.claim(w, cfg("configs/xray.py:demo", mode="stats", **{"model.width": 96}))


def test_continual_runs_are_told_apart_by_method_and_sequence(tmp_path):
  w = tmp_path / "c"
  workdir_lib.claim(w, cfg("configs/continual.py:demo,er"))
  with pytest.raises(WorkdirError, match="its method is 'er' where this run's is 'invcoss'"):
    workdir_lib.claim(w, cfg("configs/continual.py:demo"))
  with pytest.raises(WorkdirError, match="its order is"):
    workdir_lib.claim(w, cfg("configs/continual.py:demo,er,alt"))


def test_overwrite_deletes_the_old_run_and_a_legacy_workdir_is_known_by_its_config(tmp_path):
  w = tmp_path / "w"
  os.makedirs(w / "checkpoints" / "4")
  (w / "config.json").write_text(json.dumps(cfg("configs/xray.py:demo").to_dict()))  # no workdir.json
  with pytest.raises(WorkdirError, match="modality is 'xray'"):
    workdir_lib.claim(w, cfg("configs/path.py:demo"))
  workdir_lib.claim(w, cfg("configs/path.py:demo", overwrite_workdir=True))
  assert sorted(os.listdir(w)) == ["workdir.json"]
  assert json.loads((w / "workdir.json").read_text())["modality"] == "path"
  # A run recorded before a model option existed (here: the text options) is the same model, not another.
  older = tmp_path / "older"
  os.makedirs(older)
  recorded = cfg("configs/xray.py:demo").to_dict()
  for k in ("vocab_size", "pad_id", "tokenizer", "text_max_len"):
    recorded["model"].pop(k)
  (older / "config.json").write_text(json.dumps(recorded))
  workdir_lib.claim(older, cfg("configs/xray.py:demo"))
  (w / "workdir.json").write_text("{broken")
  with pytest.raises(WorkdirError, match=r"workdir.json is not valid JSON"):
    workdir_lib.claim(w, cfg("configs/path.py:demo"))


def test_a_file_or_unwritable_workdir_is_one_clear_error(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  with pytest.raises(WorkdirError, match=r"--workdir=.*afile is a file: expected a directory"):
    workdir_lib.claim(f, cfg("configs/xray.py:demo"))
  if os.geteuid() != 0:  # root writes anywhere
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    with pytest.raises(WorkdirError, match="permission denied writing"):
      workdir_lib.claim(ro / "w", cfg("configs/xray.py:demo"))
  d = workdir_lib.describe_os_error
  assert d(OSError(errno.ENOSPC, "No space left on device", "/x/statistics.npz"), "--workdir=/x").startswith(
      "no space left on the device writing /x/statistics.npz")
  assert "read-only file system" in d(OSError(errno.EROFS, "Read-only", "/x"), "--workdir=/x")
  assert "permission denied writing /x/a" in d(OSError(errno.EACCES, "Permission denied", "/x/a"), "/x")


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path):
  """The disk fills while the statistics are written: one error line naming the file, no tracebacks, the
  checkpoints intact, and the rerun (disk freed) finishes."""
  w = tmp_path / "w"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  args = [sys.executable, "-m", "invcoss_jax.main", "--config=configs/xray.py:demo", "--config.total_steps=4",
          "--config.checkpoint.every_steps=2", f"--workdir={w}"]
  p = subprocess.run(args, cwd=REPO, env=dict(env, **{faults.DISK_FULL_ENV: "atomic:statistics.npz"}),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stderr[-3000:]
  assert "error: no space left on the device writing statistics.npz" in p.stderr
  assert "Traceback" not in p.stderr
  assert os.path.isdir(w / "checkpoints" / "4") and not os.path.exists(w / "statistics.npz")
  p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert os.path.isfile(w / "statistics.npz")
