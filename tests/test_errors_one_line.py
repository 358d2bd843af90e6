"""Every error the user can fix ends as one line `error: ...` (exit 2 for options and workdirs, 1 for files and
resources), wherever it is raised (the main thread, a grain read thread, an asynchronous orbax save); Ctrl-C and
SIGTERM end with one line (exit 130 / 143); INVCOSS_DEBUG=1 keeps the traceback (docs/reliability.md)."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from invcoss_jax import main as main_lib
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.data.errors import DataError
from invcoss_jax.workdir import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def entry(*args, cwd=REPO, env=None, timeout=240):
  return subprocess.run([sys.executable, "-m", "invcoss_jax.main", *args], cwd=cwd, env=env or ENV,
                        capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(p, status, want):
  """Exit `status`, one `error:` line (the last one) containing `want`, no traceback."""
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  assert p.returncode == status, p.stderr[-3000:]
  assert len(errors) == 1 and errors[0] == lines[-1] and want in errors[0], p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]


# --- which errors are the user's ------------------------------------------------------------------------------


def test_errors_the_user_can_fix_are_one_line_with_their_exit_status():
  ue = lambda e: main_lib.user_error(e, "/w")
  assert ue(ConfigError("seed=-1: expected a non-negative integer seed")) == (
      2, "seed=-1: expected a non-negative integer seed")
  assert ue(WorkdirError("/w is in use by pid 7 on host h")) == (2, "/w is in use by pid 7 on host h")
  assert ue(DataError("/d/vocab.txt:3", "empty line")) == (1, "/d/vocab.txt:3: empty line")
  assert ue(FileNotFoundError("config.data.path='/x' does not exist\n(use a ':demo' preset)")) == (
      1, "config.data.path='/x' does not exist (use a ':demo' preset)")  # one line
  assert ue(OSError(errno.ENOSPC, "No space left on device", "/w/statistics.npz"))[1].startswith(
      "no space left on the device writing /w/statistics.npz")
  # Orbax's writer (tensorstore) reports a full disk, or a file over `ulimit -f`, as a ValueError ending in the
  # OS error code (found by benchmarks/bad_input_sweep.py on a 2 MB tmpfs: 258-920 lines of tracebacks).
  full = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.0.mu.decoder.norm.scale/0" in OCDBT database '
                    'at local file "/w/checkpoints/1.orbax-checkpoint-tmp/d/abc": Failed to write 4 bytes to file '
                    "12: No space left on device [os_error_code='28']")
  assert ue(full) == (1, "no space left on the device writing /w/checkpoints/1.orbax-checkpoint-tmp/d/abc: free "
                      "space (or point --workdir elsewhere) and rerun; what was written before is intact and the "
                      "run resumes")
  too_large = ValueError("OUT_OF_RANGE: Error writing local file \"/w/c/x\": File too large [os_error_code='27']")
  assert ue(too_large)[0] == 1 and "/w/c/x grew beyond" in ue(too_large)[1]
  assert ue(ValueError("INVALID_ARGUMENT: bad shape [os_error_code='22']")) is None  # EINVAL: not a resource
  # Wrapped (`raise ... from`) by a library or a thread pool: the user's error underneath is the line.
  try:
    try:
      raise DataError("/d/a.npz", "bad header")
    except DataError as e:
      raise RuntimeError("worker failed") from e
  except RuntimeError as wrapped:
    assert ue(wrapped) == (1, "/d/a.npz: bad header")
  # A bug keeps its traceback, also one raised while handling a missing file (a look-up with a fallback).
  assert ue(ValueError("operands could not be broadcast")) is None
  try:
    try:
      open("/nonexistent/cache.json")
    except FileNotFoundError:
      raise KeyError("a bug in the fallback")
  except KeyError as bug:
    assert ue(bug) is None
  import ml_collections
  assert not main_lib.debugging() and main_lib.debugging(ml_collections.ConfigDict(dict(debug=True)))


def test_an_error_in_a_grain_read_thread_is_the_readers_error():
  """A file that fails in one of grain's read threads: the reader's own error reaches the main thread."""
  import grain

  def read(i):
    if i == 5:
      raise DataError("/data/shard_5.npz", "images: expected 4 dimensions, got 2")
    return i

  it = grain.MapDataset.range(16).map(read).to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  with pytest.raises(Exception) as info:
    list(it)
  assert main_lib.user_error(info.value, "/w") == (1, "/data/shard_5.npz: images: expected 4 dimensions, got 2")


def test_an_error_in_an_asynchronous_checkpoint_save_reaches_the_main_thread(tmp_path, monkeypatch):
  """The disk fills while orbax commits a checkpoint in its background thread: the next wait raises that error
  in the main thread, and it is the one line (orbax's own log of it loses its traceback, see main.py)."""
  import jax.numpy as jnp
  import ml_collections
  import orbax.checkpoint as ocp
  from invcoss_jax.train import checkpoint as ckpt_lib

  class FullDisk:
    def result(self, timeout=None):
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "1" / "state"))

  save = ocp.StandardCheckpointHandler.async_save

  async def failing_save(self, *args, **kwargs):
    return list(await save(self, *args, **kwargs) or []) + [FullDisk()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_save)
  manager = ckpt_lib.make_manager(tmp_path, ml_collections.ConfigDict(dict(every_steps=1, max_to_keep=None,
                                                                          async_save=True)))
  with pytest.raises(OSError) as info:
    ckpt_lib.save(manager, 1, {"w": jnp.ones(3)}, None, ml_collections.ConfigDict(dict(seed=0)), force=True)
    manager.wait_until_finished()
  status, line = main_lib.user_error(info.value, str(tmp_path))
  assert status == 1 and line.startswith(f"no space left on the device writing {tmp_path}/checkpoints/1/state")


def test_a_checkpoint_of_other_shapes_is_one_error_naming_it(tmp_path):
  """orbax's 'Requested shape (4005,) is not compatible with the stored shape (4006,)' names no checkpoint."""
  import jax
  import jax.numpy as jnp
  from invcoss_jax.train import checkpoint as ckpt_lib
  manager = ckpt_lib.make_manager(tmp_path)
  import ml_collections
  ckpt_lib.save(manager, 3, {"token_embed": jnp.zeros((4006,))}, None, ml_collections.ConfigDict(dict(seed=0)),
                force=True)
  manager.wait_until_finished()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"token_embed": jax.ShapeDtypeStruct((4005,), jnp.float32, sharding=sharding)}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/3: does not fit this run's model \(Requested "
                                                     r"shape: \(4005,\) is not compatible with the stored shape: "
                                                     r"\(4006,\)\)"):
    ckpt_lib.restore(manager, target)
  manager.close()


def test_a_report_stage_fine_tuned_on_an_image_task_says_it_has_text_only():
  """It said 'pre-trained on 3D volumes only' of a report stage."""
  import jax
  import numpy as np
  from invcoss_jax.defaults import load_config_file
  from invcoss_jax.evaluate import finetune
  c = load_config_file(os.path.join(REPO, "configs/evaluate.py:pneumonia"))
  c.model.width, c.model.depth, c.model.num_heads = 64, 1, 4
  task = c.evaluate.tasks.pneumonia
  task.data.image_size = 32
  model = finetune.build_model(task, c.model, "finetune", (32, 32, 3))
  params, _ = finetune.init_params(model, jax.random.PRNGKey(0), (32, 32, 3))
  report_stage = {"encoder": params["backbone"]["encoder"], "cls_token": params["backbone"]["cls_token"],
                  "token_embed": {"embedding": np.zeros((50, 64), np.float32)}}
  with pytest.raises(ConfigError, match=r"report_stage has no 2D tokenizer \(patch_embed_2d\): it was pre-trained "
                                        r"on report text only \(a report stage\)"):
    finetune.init_params(model, jax.random.PRNGKey(0), (32, 32, 3), report_stage, "report_stage")


# --- the entry point ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, status, want", [
    # an option outside config_checks.py before this change: a traceback, exit 1
    (["--config=configs/evaluate.py:pneumonia", "--config.evaluate.seeds=()"], 2,
     "error: evaluate.seeds=(): expected at least one seed"),
    (["--config=configs/retention.py:tiny", "--config.retention.methods=('seqssl','nonsense')"], 2,
     "error: config.retention.methods: ['nonsense'] are not continual methods"),
    (["--config=configs/xray.py:demo", "--config.seed=-1"], 2,
     "error: seed=-1: expected a non-negative integer seed"),
    # a missing data folder: a traceback, exit 1
    (["--config=configs/xray.py", "--config.data.path=/nonexistent/xray"], 1,
     "error: config.data.path='/nonexistent/xray' does not exist"),
])
def test_the_entry_point_prints_one_line(tmp_path, args, status, want):
  p = entry(*args, f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(p, status, want)


def test_a_bad_vocabulary_file_is_one_line(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n[MASK]\nlung\n")
  p = entry("--config=configs/report.py:demo", f"--config.data.text.tokenizer={vocab}",
            f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(p, 1, f"error: {vocab}:3")  # the file and its line


def test_debug_keeps_the_traceback(tmp_path):
  p = entry("--config=configs/evaluate.py:pneumonia", "--config.evaluate.seeds=()", f"--workdir={tmp_path / 'w'}",
            env=dict(ENV, INVCOSS_DEBUG="1"))
  assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError: evaluate.seeds=()" in p.stderr


def test_a_relative_config_path_is_found_from_another_directory_or_named(tmp_path):
  """`--config=configs/xray.py` run outside the checkout: found next to the package (as load_config_file finds
  it); a file found nowhere is one line naming where it was looked for (it was a traceback in ml_collections)."""
  p = entry("--config=configs/xray.py:demo", "--config.seed=-2", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert_one_error_line(p, 2, "error: seed=-2")  # the config was loaded: its option was checked
  p = entry("--config=configs/xray_typo.py", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert_one_error_line(p, 2, f"error: --config=configs/xray_typo.py: no such config file (looked for "
                              f"{tmp_path}/configs/xray_typo.py and {REPO}/configs/xray_typo.py)")
  p = entry("--config=configs/ct.py:dmeo", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert_one_error_line(p, 2, "error: --config=configs/ct.py:dmeo: ValueError: configs/ct.py: unknown preset 'dmeo'")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_end_with_one_line(tmp_path, sig, status):
  """Mid-run, after a checkpoint: one line, exit 128 + signal, none of the reader and checkpoint threads'
  tracebacks (Ctrl-C during an asynchronous save printed 1,406 lines)."""
  w = tmp_path / "w"
  p = subprocess.Popen([sys.executable, "-m", "invcoss_jax.main", "--config=configs/xray.py:demo",
                        "--config.total_steps=400", "--config.checkpoint.every_steps=2",
                        "--config.checkpoint.async_save=True", f"--workdir={w}"],
                       cwd=REPO, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  try:
    deadline = time.time() + 180
    while not os.path.isdir(w / "checkpoints" / "4") and time.time() < deadline and p.poll() is None:
      time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()[-3000:]
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      p.kill()
  lines = [line for line in err.splitlines() if line.strip()]
  assert p.returncode == status, err[-3000:]
  assert lines[-1] == (f"interrupted ({signal.Signals(sig).name}): the workdir is consistent; rerun the same "
                       "command to resume"), err[-3000:]
  assert "Traceback" not in err, err[-3000:]
