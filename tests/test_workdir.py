"""A workdir remembers what it holds: another mode, modality, model, sequence or task is refused before
anything is written; file-system errors are one clear line."""

import errno
import json
import os
import subprocess
import sys

import ml_collections
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
  # The stage trained (a record of a run that wrote nothing binds nothing: test below).
  (w / "checkpoints").mkdir()
  (w / "config.json").write_text(json.dumps(cfg("configs/xray.py:demo").to_dict()))
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
  (w / "stage_1_xray").mkdir()
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


def test_a_record_of_a_run_that_wrote_nothing_binds_nothing(tmp_path):
  """A run refused or failed before it wrote anything (its data missing, say) left only workdir.json: the
  corrected run, even of another modality, is this workdir's first, not 'another run'."""
  w = tmp_path / "w"
  workdir_lib.claim(w, cfg("configs/xray.py:demo"))
  workdir_lib.claim(w, cfg("configs/path.py:demo"))
  assert json.loads((w / "workdir.json").read_text())["modality"] == "path"


# --- one run per workdir: the lock ----------------------------------------------------------------------------

HOLDER = ("import sys, time\nfrom invcoss_jax import workdir_lock\nwith workdir_lock.hold(sys.argv[1]):\n"
          "  print('held', flush=True)\n  time.sleep(300)\n")


def test_a_second_run_on_a_held_workdir_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
  """Two runs on one workdir both exited 0 and the last writer won (seed 0's run vanished under seed 1's)."""
  import socket
  from invcoss_jax import workdir_lock
  w = tmp_path / "w"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(w)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=rf"^{w} is in use by pid {holder.pid} on host {socket.gethostname()} "
                                           r"\(started at \d{4}-\d\d-\d\dT[\d:]+[+-][\d:]+\): wait for that run"):
      jobs.run(cfg("configs/xray.py:demo", total_steps=2, seed=1), w)
    assert sorted(os.listdir(w)) == [".lock"]  # nothing recorded
  finally:
    holder.kill()
    holder.wait()
  # The holder died (as after SIGKILL or a preemption): the kernel released its flock; the file still names it.
  assert json.loads((w / ".lock").read_text())["pid"] == holder.pid
  with workdir_lock.hold(w):
    assert json.loads((w / ".lock").read_text())["pid"] == os.getpid()
    with workdir_lock.hold(w):  # re-entrant: jobs.run, then continual.sequence.run in the same workdir
      assert workdir_lock.holds(w)
    assert workdir_lock.holds(w)
  assert not workdir_lock.holds(w)


def test_a_workdir_path_too_long_for_a_runs_files_is_refused_before_anything_is_created(tmp_path):
  """It failed mid-run inside orbax."""
  name_max, path_max = os.pathconf(tmp_path, "PC_NAME_MAX"), os.pathconf(tmp_path, "PC_PATH_MAX")
  with pytest.raises(WorkdirError, match=rf"is {name_max + 1} bytes; the file system allows {name_max} "
                                         r"\(PC_NAME_MAX\): choose a shorter --workdir"):
    jobs.run(cfg("configs/xray.py:demo", total_steps=2), tmp_path / ("n" * (name_max + 1)))
  deep = tmp_path.joinpath(*["d" * 100] * ((path_max - len(str(tmp_path)) - 150) // 101))  # fits, files do not
  with pytest.raises(WorkdirError, match=rf"is {len(str(deep))} bytes long: with the files a run writes under it "
                                         rf".* the file system's limit of {path_max} \(PC_PATH_MAX\)"):
    jobs.run(cfg("configs/xray.py:demo", total_steps=2), deep)
  assert os.listdir(tmp_path) == []


def test_a_finished_stage_keeps_its_record(tmp_path):
  """A rerun of a finished stage with other options rewrote its config.json, which no longer described what
  trained it; the record is written once the run was checked and its checkpoint restored, and never again once
  the stage is finished."""
  w = tmp_path / "w"
  jobs.run(cfg("configs/xray.py:demo", total_steps=2, **{"train.stats_after_pretrain": False}), w)
  record = (w / "config.json").read_bytes()
  jobs.run(cfg("configs/xray.py:demo", total_steps=2, **{"train.stats_after_pretrain": False,
                                                        "train.base_lr": 0.5}), w)
  assert (w / "config.json").read_bytes() == record


# --- a checkpoint knows its vocabulary ------------------------------------------------------------------------

WORDS = ("heart size normal lungs clear no acute cardiopulmonary process pleural effusion pneumothorax focal "
         "consolidation mild cardiomegaly opacity right left lower lobe atelectasis stable").split()


def tiny_report_stage(tmp_path, **overrides):
  """The report demo on 60 made-up reports (a tokenizer of a few dozen tokens): 2 steps of a micro trunk."""
  import random
  csv = tmp_path / "reports.csv"
  if not csv.exists():
    rng = random.Random(0)
    csv.write_text("uid,findings,impression\n" + "".join(
        f"{i},{' '.join(rng.choices(WORDS, k=12))},{' '.join(rng.choices(WORDS, k=4))}\n" for i in range(60)))
  return cfg("configs/report.py:demo", **{"total_steps": 2, "data.path": str(csv), "data.text.max_length": 16,
                                          "data.text.vocab_size": 80, "train.global_batch_size": 8,
                                          "checkpoint.every_steps": 1, **overrides})


def write_vocab(path, tokens):
  path.write_text("".join(t + "\n" for t in tokens))
  return str(path)


def test_a_checkpoint_knows_its_vocabulary(tmp_path):
  """A resume with a vocabulary of another size (and another lr) failed in orbax after rewriting the finished
  stage's config.json; one of the same size with its ids in another order was accepted. Both are now one
  error naming both fingerprints, before anything is written; fine-tuning and continual loading check it too."""
  import hashlib
  from invcoss_jax.continual import sequence, stages
  from invcoss_jax.data import tokenization
  from invcoss_jax.jobs import evaluate as evaluate_job
  from invcoss_jax.train import vocabulary
  w = tmp_path / "report"
  jobs.run(tiny_report_stage(tmp_path), w)
  tok = tokenization.load_tokenizer(str(w / "tokenizer.json"))
  tokens = [t for t, _ in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
  sha = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()
  assert json.loads((w / "vocabulary.json").read_text()) == dict(tokenizer=str(w / "tokenizer.json"), sha256=sha,
                                                                size=len(tokens))
  outputs = lambda: {k: v for k, v in snapshot(w).items() if not k.endswith(".lock")}  # the lock is rewritten
  before = outputs()
  record = (w / "config.json").read_bytes()
  bigger = write_vocab(tmp_path / "bigger.txt", tokens + ["zzzz"])
  with pytest.raises(vocabulary.VocabularyError, match=(
      rf"^{bigger}: this vocabulary \(sha256 \w{{12}}, {len(tokens) + 1} tokens, {bigger}\) is not the one the stage "
      rf"in {w} was trained with \(sha256 {sha[:12]}, {len(tokens)} tokens, {w}/tokenizer.json\)")):
    jobs.run(tiny_report_stage(tmp_path, total_steps=4, **{"data.text.tokenizer": bigger, "train.base_lr": 0.5}), w)
  swapped = write_vocab(tmp_path / "swapped.txt", tokens[:5] + [tokens[6], tokens[5]] + tokens[7:])
  with pytest.raises(vocabulary.VocabularyError, match=rf"\(sha256 \w{{12}}, {len(tokens)} tokens, {swapped}\) is "
                                                       rf"not the one .* \(sha256 {sha[:12]}, {len(tokens)} tokens"):
    jobs.run(tiny_report_stage(tmp_path, total_steps=4, **{"data.text.tokenizer": swapped}), w)
  assert (w / "config.json").read_bytes() == record and outputs() == before
  # The same token list as a vocab.txt is the same vocabulary.
  vocabulary.check(w, write_vocab(tmp_path / "same.txt", tokens), "resuming it")
  # Fine-tuning on a text task, and a continual sequence starting from the stage (config.init_from).
  task = cfg("configs/evaluate.py:indiana_abnormal").evaluate.tasks.indiana_abnormal
  task.data.text.tokenizer = swapped
  model_cfg = ml_collections.ConfigDict(json.loads(record)["model"])
  with pytest.raises(vocabulary.VocabularyError, match=r"fine-tuning it on indiana_abnormal would read"):
    evaluate_job.prepare_text_task(task, "indiana_abnormal", model_cfg, str(tmp_path / "eval"), True, str(w))
  c = cfg("configs/continual.py:demo,report", init_from=str(w))
  c.model.tokenizer = swapped
  with pytest.raises(vocabulary.VocabularyError, match=r"starting the sequence from config.init_from would read"):
    sequence.check_vocabularies(c, stages.plan_stages(c, tmp_path / "seq"))
