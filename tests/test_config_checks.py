"""Options checked before any work starts: every shipped preset passes, each bad option is named."""

import os
import subprocess
import sys

import pytest

from invcoss_jax import config_checks, jobs
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.defaults import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = ["configs/xray.py", "configs/xray.py:demo", "configs/ct.py", "configs/ct.py:demo", "configs/mri.py",
         "configs/mri.py:demo", "configs/path.py", "configs/path.py:demo", "configs/continual.py",
         "configs/continual.py:demo", "configs/continual.py:demo,alt,er", "configs/evaluate.py",
         "configs/retention.py:quick", "configs/retention.py:full", "configs/retention.py:tiny", "configs/report.py",
         "configs/report.py:demo"]


@pytest.mark.parametrize("spec", SPECS)
def test_every_shipped_preset_passes(spec):
  config_checks.check_options(load_config_file(os.path.join(REPO, spec)))


@pytest.mark.parametrize("key,value,match", [
    ("train.mask_ratio", 1.0, r"train.mask_ratio=1.0: expected 0 <= ratio < 1"),
    ("train.mask_ratio", -0.1, r"train.mask_ratio=-0.1: expected 0 <= ratio < 1"),
    ("train.mask_ratio", 0.97, r"mask_ratio=0.97 with 16 patches per example of data keeps 0"),
    ("train.mask_ratio", 0.0, r"mask_ratio=0.0 with 16 patches per example of data keeps 16"),
    ("train.global_batch_size", 0, r"train.global_batch_size=0"),
    ("train.base_lr", float("nan"), r"train.base_lr=nan"),
    ("data.image_size", 36, r"data.image_size=36: the image of \(36, 36\) is not tiled by "
                            r"model.patch_size_2d=\(8, 8\) \(36 is not a multiple of 8\)"),
    ("model.patch_size_2d", (8, 0), r"model.patch_size_2d=\(8, 0\): expected 2 positive sizes"),
])
def test_bad_options_are_named(key, value, match):
  c = load_config_file(os.path.join(REPO, "configs/xray.py:demo"))
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(ConfigError, match=match):
    config_checks.check_options(c)


def test_volumes_of_a_continual_stage_must_be_tiled_by_the_3d_patch():
  c = load_config_file(os.path.join(REPO, "configs/continual.py:demo"))
  c.continual.datasets.ct.volume_shape = (16, 32, 36)
  with pytest.raises(ConfigError, match=r"continual.datasets.ct.volume_shape=\(16, 32, 36\)"):
    config_checks.check_options(c)
  c.continual.order = ("xray", "path")  # a modality not in the sequence is not checked
  config_checks.check_options(c)


def test_jobs_run_checks_before_writing(tmp_path):
  c = load_config_file(os.path.join(REPO, "configs/xray.py:demo"))
  c.train.mask_ratio = 1.0
  with pytest.raises(ConfigError):
    jobs.run(c, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_unknown_override_names_the_nearest_options():
  c = load_config_file(os.path.join(REPO, "configs/xray.py:demo"))
  config_checks.check_override_keys(c, ["train.mask_ratio", "data.xray.hflip", "inversion.schedule_2d.steps"])
  with pytest.raises(ConfigError, match=r"--config.train.mask_ration: no such option .* did you mean "
                                        r"--config.train.mask_ratio"):
    config_checks.check_override_keys(c, ["train.mask_ration"])
  with pytest.raises(ConfigError, match=r"--config.nosuch.key: .* options at the top level: audit, checkpoint"):
    config_checks.check_override_keys(c, ["nosuch.key"])
  assert config_checks.override_keys(["--config=x.py", "--config.a.b=1", "--config.c", "2", "--workdir=w"]) == [
      "a.b", "c"]


def test_entry_point_reports_option_errors_without_a_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for arg, want in (("--config.train.mask_ration=0.5", "did you mean --config.train.mask_ratio"),
                    ("--config.train.mask_ratio=1.0", "train.mask_ratio=1.0: expected 0 <= ratio < 1")):
    p = subprocess.run([sys.executable, "-m", "invcoss_jax.main", "--config=configs/xray.py:demo", arg,
                        f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2 and f"error: " in p.stderr and want in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("spec, key, value, match", [
    ("configs/xray.py:demo", "seed", -1, r"^seed=-1: expected a non-negative integer seed"),  # numpy named no option
    ("configs/xray.py:demo", "total_steps", -3, r"^total_steps=-3: expected a positive number of training steps, "
                                                r"or -1"),  # ran 300 epochs
    ("configs/xray.py:demo", "total_steps", 0, r"^total_steps=0: expected a positive number"),
    ("configs/evaluate.py:pneumonia", "evaluate.seeds", (), r"^evaluate.seeds=\(\): expected at least one seed"),
    ("configs/evaluate.py:pneumonia", "evaluate.seeds", (0, -5), r"^evaluate.seeds\[1\]=-5: expected a non-negative"),
    ("configs/retention.py:tiny", "retention.seeds", (), r"^retention.seeds=\(\): expected at least one seed"),
    ("configs/retention.py:tiny", "retention.seeds", (1, 1), r"^retention.seeds=\(1, 1\): a seed repeats"),
    ("configs/continual.py:demo", "continual.stage_steps", (5, -1, 5, 5), r"^continual.stage_steps=\(5, -1, 5, 5\): "
                                                                          r"expected positive steps"),
    ("configs/xray.py:demo", "train.grad_accum_steps", 3, r"^train.grad_accum_steps=3: expected a positive divisor "
                                                          r"of train.global_batch_size=32"),
])
def test_steps_seeds_and_batches_are_checked_for_sign_and_range(spec, key, value, match):
  c = load_config_file(os.path.join(REPO, spec))
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    config_checks.check_options(c)


def test_a_batch_larger_than_the_dataset_is_refused_with_its_size(tmp_path):
  """Each demo X-ray was repeated 16 times in a batch; a batch of 100,000 ran 44 s into an out-of-memory."""
  c = load_config_file(os.path.join(REPO, "configs/xray.py:demo"))
  c.train.global_batch_size = 1504
  with pytest.raises(ConfigError, match=r"^train.global_batch_size=1504 is larger than the 1500 examples of data "
                                        r"\(name 'demo_xray', split 'train'\): every step would repeat examples; "
                                        r"expected at most 1500"):
    jobs.run(c, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w" / "config.json")
  # Windows of 3D volumes: a batch of windows from fewer volumes is usual; said, not refused.
  config_checks.check_batch_fits("train.global_batch_size", 64, 27, "continual.datasets.ct", volumes=True)


def test_a_typo_in_the_method_or_order_is_refused_before_the_workdir_records_it(tmp_path):
  """It was recorded in workdir.json first; the corrected rerun was then refused as 'another run'."""
  from invcoss_jax import workdir as workdir_lib
  w = tmp_path / "w"
  for key, value, match in (("method", "invcos", r"config.continual.method='invcos': expected one of"),
                            ("order", ("xray", "ctt"), r"config.continual.order names \['ctt'\]"),
                            ("stage_steps", (5, 5, 5), r"stage_steps=\(5, 5, 5\): expected one entry per stage")):
    c = load_config_file(os.path.join(REPO, "configs/continual.py:demo"))
    c.continual[key] = value
    with pytest.raises(ConfigError, match=match):
      jobs.run(c, w)
    assert not os.path.exists(w)
  r = load_config_file(os.path.join(REPO, "configs/retention.py:tiny"))
  r.retention.methods = ("seqssl", "invcos")
  with pytest.raises(ConfigError, match=r"config.retention.methods: \['invcos'\] are not continual methods"):
    jobs.run(r, w)
  assert not os.path.exists(w)
  good = load_config_file(os.path.join(REPO, "configs/continual.py:demo"))
  jobs.check_job_options(good)
  workdir_lib.claim(w, good)  # the corrected run is this workdir's first


def test_init_from_a_continual_workdir_names_its_stages(tmp_path):
  seq = tmp_path / "continual_run"
  for name in ("stage_1_xray", "stage_2_ct"):
    os.makedirs(seq / name / "checkpoints" / "2")
    (seq / name / "config.json").write_text("{}")
  (seq / "continual.json").write_text("{}")
  c = load_config_file(os.path.join(REPO, "configs/evaluate.py:pneumonia"))
  c.init_from = str(seq)
  with pytest.raises(ConfigError, match=rf"config.init_from='{seq}' is a continual run's workdir, not a stage's: "
                                        rf"point it at one of its stages, e.g. {seq}/stage_2_ct \(stages: "
                                        r"stage_1_xray, stage_2_ct\)"):
    jobs.run(c, tmp_path / "eval")
  assert not os.path.exists(tmp_path / "eval")
  c.init_from = str(seq / "stage_2_ct")
  jobs.check_job_options(c)


def test_one_name_per_value_moved_options_are_refused_naming_the_new_one(tmp_path):
  """config.method was an alias of config.continual.method, and the buffer fraction lived under continual.,
  inversion. and audit.: each value has one option now. On the command line `--config.method` stays the
  documented alias (resolved in one place); any other use of an old name is an error naming the new one."""
  assert config_checks.resolve_aliases(["--config=c.py", "--config.method=er", "--config.method", "ewc",
                                        "--config.methods=x", "--workdir=w"]) == [
      "--config=c.py", "--config.continual.method=er", "--config.continual.method", "ewc", "--config.methods=x",
      "--workdir=w"]
  c = load_config_file(os.path.join(REPO, "configs/continual.py:demo"))
  assert "method" not in c and float(c.continual.buffer_fraction) == 0.05
  config_checks.check_override_keys(c, config_checks.override_keys(
      config_checks.resolve_aliases(["--config.method=er"])))
  for key, new in (("inversion.buffer_fraction", "continual.buffer_fraction"),
                   ("audit.buffer_fraction", "continual.buffer_fraction"), ("method", "continual.method")):
    with pytest.raises(ConfigError, match=rf"^--config\.{key} is no longer an option: it moved to --config\.{new}"):
      config_checks.check_override_keys(c, [key])
  for key, value, new in (("method", "er", "continual.method"),
                          ("inversion.buffer_fraction", 0.1, "continual.buffer_fraction"),
                          ("audit.buffer_fraction", 0.1, "continual.buffer_fraction")):
    c = load_config_file(os.path.join(REPO, "configs/continual.py:demo"))
    c.update_from_flattened_dict({key: value}) if "." in key else setattr(c, key, value)
    with pytest.raises(ConfigError, match=rf"^config\.{key} is no longer an option: it moved to config\.{new}"):
      jobs.run(c, tmp_path / "w")
    assert not os.path.exists(tmp_path / "w")
  # A stage's config.json recorded before the move is read without the old names.
  recorded = dict(method="er", continual=dict(method="er"), inversion=dict(buffer_fraction=0.05, jitter=0),
                  audit=dict(buffer_fraction=0.05))
  assert config_checks.without_moved(recorded) == dict(continual=dict(method="er"), inversion=dict(jitter=0),
                                                       audit={})
  assert recorded["inversion"] == dict(buffer_fraction=0.05, jitter=0)  # the caller's dict is left as it was


def test_an_unknown_inversion_option_is_refused_before_the_job_starts(tmp_path):
  c = load_config_file(os.path.join(REPO, "configs/xray.py:demo"))
  c.inversion.jiter = 2
  with pytest.raises(ConfigError, match=r"^config\.inversion\.jiter is not an option of the inversion"):
    jobs.run(c, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_the_method_alias_on_the_command_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for arg, want in (("--config.method=invcos", "config.continual.method='invcos': expected one of"),
                    ("--config.audit.buffer_fraction=0.1", "--config.audit.buffer_fraction is no longer an option: "
                                                           "it moved to --config.continual.buffer_fraction")):
    p = subprocess.run([sys.executable, "-m", "invcoss_jax.main", "--config=configs/continual.py:demo", arg,
                        f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2 and want in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")
