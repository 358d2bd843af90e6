"""The `audit` job end to end on demo X-rays: a pre-trained stage (the pretrain job), a "synthetic" set of
unseen real images written as inversion shards, and the drawn `er` replay buffer as the leak.

The held-out and "synthetic" images must be drawn like the training images (the audit compares them; a
shift in class mix between splits would read as leakage or its absence), so the stage here trains on a random
part of the demo training split and its held-out and "synthetic" images are other random parts of it."""

import importlib.util
import json
import os

import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax import jobs
from invcoss_jax.jobs import audit as audit_job
from invcoss_jax.npz_io import write_shards
from invcoss_jax.jobs.pretrain import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = 0.1


def demo_config():
  spec = importlib.util.spec_from_file_location("cfg_xray_audit", os.path.join(REPO, "configs", "xray.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("demo")


SIZES = dict(train=600, val=200, test=200)


@pytest.fixture(scope="module")
def iid_splits(tmp_path_factory):
  """An npz (MedMNIST keys) whose train/val/test are disjoint random parts of the demo training split, with
  their labels (the judge net of the audit's judges trains on them)."""
  cfg = data_lib.data_config()
  cfg.name = "demo_xray"
  path = data_lib.resolve(cfg).path
  with np.load(path) as f:
    images, labels = f["train_images"], f["train_labels"]
  order = np.random.default_rng(0).permutation(len(images))
  out, start = {}, 0
  for split, n in SIZES.items():
    out[f"{split}_images"] = images[order[start:start + n]]
    out[f"{split}_labels"] = labels[order[start:start + n]]
    start += n
  file = str(tmp_path_factory.mktemp("data") / "xray_iid.npz")
  np.savez(file, **out)
  return file


def stage_data(c, file):
  c.data.update(dict(name="folder", format="npz", path=file, modality="xray"))
  return c


@pytest.fixture(scope="module")
def stage(tmp_path_factory, iid_splits):
  workdir = str(tmp_path_factory.mktemp("stage"))
  c = stage_data(demo_config(), iid_splits)
  c.total_steps = 4
  c.train.stats_after_pretrain = False
  c.checkpoint.every_steps = 4
  c.logging.image_every_steps = 0
  pretrain(c, workdir)
  return workdir


def audit_config(stage_dir, synthetic_path, **audit):
  c = demo_config()  # the audit reads the stage's data section, not this one
  c.mode = "audit"
  c.init_from = stage_dir
  c.audit.synthetic_path = synthetic_path
  c.audit.max_members = 200
  c.audit.num_bootstrap = 200
  c.audit.memorisation_quantile = Q
  c.audit.num_pairs = 4
  c.audit.judges.update(dict(folds=2, cnn_steps=10, judge_net_steps=10))
  c.audit.update(audit)
  return c


@pytest.fixture(scope="module")
def unseen_as_synthetic(tmp_path_factory, iid_splits):
  """The test split's real images written by the inversion job's shard writer, into an `invert`-like
  workdir: a set the stage never saw, so it must score the base rate."""
  cfg = stage_data(demo_config(), iid_splits).data
  images = np.concatenate([b["image"] for b in data_lib.make_eval_iterator(
      cfg, batch_size=128, split="test", process_index=0, process_count=1)])
  invert_dir = str(tmp_path_factory.mktemp("invert"))
  write_shards(os.path.join(invert_dir, "synthetic"), images, shard_size=100)
  return invert_dir, images


@pytest.fixture(scope="module")
def audit(tmp_path_factory, stage, unseen_as_synthetic):
  workdir = str(tmp_path_factory.mktemp("audit"))
  out = jobs.run(audit_config(stage, unseen_as_synthetic[0]), workdir)
  return workdir, out


def test_writes_json_summary_and_figures(audit):
  workdir, out = audit
  with open(os.path.join(workdir, "audit.json")) as f:
    assert json.load(f) == json.loads(json.dumps(out))
  assert set(out["figures"]) == {"distances", "spectra", "membership", "closest_pairs_heldout",
                                 "closest_pairs_synthetic", "closest_pairs_er_buffer"}
  for name in out["figures"].values():
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  with open(os.path.join(workdir, "audit.md")) as f:
    md = f.read()
  assert f"**{out['membership_inference']['auc']:.3f}**" in md and "| er_buffer | 30 | pixel |" in md
  assert not [f for f in os.listdir(workdir) if f.startswith(".tmp")]  # atomic writes left nothing behind


def test_sizes_and_sources(audit, unseen_as_synthetic):
  _, out = audit
  assert out["image_shape"] == [32, 32, 3]
  assert out["train"]["num_examples"] == 600 and out["heldout"]["num_examples"] == 200
  syn, buf = out["sets"]["synthetic"], out["sets"]["er_buffer"]
  assert syn["num_samples"] == len(unseen_as_synthetic[1]) == 200
  assert buf["num_samples"] == buf["set_size"] == 30  # 5 % of 600, method `er`
  assert out["heldout_reference"]["pixel"]["to_train"]["count"] == 200


def test_replay_buffer_is_fully_memorised(audit):
  _, out = audit
  buf = out["sets"]["er_buffer"]
  assert buf["pixel"]["to_train"]["max"] == 0.0  # its samples are training images
  assert buf["feature"]["to_train"]["max"] < 1e-5
  for sp in ("pixel", "feature"):
    m = buf[sp]["memorisation"]
    assert m["rate"] == 1.0 and m["count"] == 30 and m["ci_bootstrap"] == [1.0, 1.0]
    assert m["ci"] == pytest.approx([0.025 ** (1 / 30), 1.0])  # the exact bound for 30 of 30
    assert buf[sp]["median_ratio_train_over_heldout"] < 1e-3


def test_unseen_real_images_score_the_base_rate(audit):
  _, out = audit
  m = out["sets"]["synthetic"]["pixel"]["memorisation"]
  assert m["base_rate"] == Q and m["rate"] < 0.25 and m["ci"][0] < Q, m
  assert out["sets"]["synthetic"]["pixel"]["to_train"]["min"] > 0.0
  hf = out["sets"]["synthetic"]["high_frequency"]
  assert 0.6 < hf["relative_to_training"] < 1.6  # real X-rays have X-ray spectra


def test_membership_inference_of_a_barely_trained_stage_is_chance(audit):
  _, out = audit
  mia = out["membership_inference"]
  assert mia["num_members"] == 200 and mia["num_nonmembers"] == 200 and mia["mask_ratio"] == 0.75
  assert mia["ci"][0] < 0.5 < mia["ci"][1], mia
  assert set(mia["tpr_at_fpr"]) == {"0.01", "0.1"}


def test_clear_errors(stage, unseen_as_synthetic, tmp_path):
  with pytest.raises(ValueError, match="config.init_from"):
    audit_job.run(audit_config("", unseen_as_synthetic[0]), tmp_path)
  c = audit_config(stage, unseen_as_synthetic[0])
  c.audit.heldout_data.split = "train"
  with pytest.raises(ValueError, match="overlaps the training split"):
    audit_job.run(c, tmp_path)
  with pytest.raises(FileNotFoundError, match="config.audit.synthetic_path"):
    audit_job.run(audit_config(stage, str(tmp_path / "missing")), tmp_path)
  c = audit_config(stage, unseen_as_synthetic[0])
  c.audit.train_data.update({"no_such_field": 1})
  with pytest.raises(ValueError, match="no_such_field"):
    audit_job.run(c, tmp_path)


def test_shard_folder_accepts_shards_or_an_invert_workdir(unseen_as_synthetic, tmp_path):
  invert_dir, _ = unseen_as_synthetic
  shards = os.path.join(invert_dir, "synthetic")
  assert audit_job.shard_folder(invert_dir, "opt") == shards == audit_job.shard_folder(shards, "opt")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="opt=.*holds no .npz shards"):
    audit_job.shard_folder(str(tmp_path / "empty"), "opt")


def test_subset_is_all_or_a_sorted_sample_without_repeats():
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(audit_job.subset(5, 0, rng), np.arange(5))
  np.testing.assert_array_equal(audit_job.subset(5, 9, rng), np.arange(5))
  s = audit_job.subset(100, 10, rng)
  assert len(np.unique(s)) == 10 and np.all(np.diff(s) > 0) and s.max() < 100


def test_judges_of_every_set_against_the_same_heldout_images(audit, unseen_as_synthetic, iid_splits):
  workdir, out = audit
  judged, info = out["judges"], out["judges_info"]
  assert list(judged) == ["synthetic", "er_buffer", "real_vs_real", "smoothed_noise"]
  assert info["n"] == 30  # the replay buffer is the smallest set
  # The judge net trains on training images outside the real-vs-real sample and the drawn buffer (30 each).
  assert info["judge_net"]["trained"] and 600 - 60 <= info["judge_net"]["num_train"] <= 600 - 30
  assert 0.0 <= info["judge_net"]["heldout_accuracy"] <= 1.0
  for name, j in judged.items():
    assert j["n_candidate"] == j["n_real"] == 30, name
    for key in ("c2st_logistic_auc", "c2st_statistics_auc", "c2st_cnn_auc"):
      assert 0.0 <= j[key] <= 1.0, (name, key, j[key])
    for key in ("kid", "precision", "recall", "density", "coverage", "mean_map_corr", "std_map_corr"):
      assert j[key] is not None and np.isfinite(j[key]), (name, key)
  # Real vs real: training images, none of them among the held-out ones (nor among the held-out split).
  assert judged["real_vs_real"]["heldout_duplicates"] == 0
  with np.load(iid_splits) as f:
    train, val = f["train_images"], f["val_images"]
  assert not {x.tobytes() for x in train} & {x.tobytes() for x in val}
  # Smoothed noise has no anatomy: even a linear classifier on pixels tells it from real images. (Not the
  # statistics judge here: at 30 images per fold its gradient boosting, 20 examples per leaf, cannot split.)
  assert judged["smoothed_noise"]["c2st_logistic_auc"] > 0.8 > judged["real_vs_real"]["c2st_logistic_auc"]
  with open(os.path.join(workdir, "audit.md")) as f:
    md = f.read()
  assert "## Independent judges of the synthetic set" in md and "AUC is 0.5 when" in md
  assert "| set | C2ST logistic AUC | C2ST statistics AUC | C2ST CNN AUC | KID |" in md
  for row in ("| synthetic |", "| replay buffer |", "| real vs real |", "| smoothed noise |"):
    assert row in md.split("## Independent judges")[1], row


def test_judges_report_without_judge_net_or_when_skipped():
  from invcoss_jax.audit import report
  row = dict(c2st_logistic_auc=0.5, c2st_statistics_auc=0.61, c2st_cnn_auc=None, mean_map_corr=0.9, std_map_corr=0.8)
  info = dict(n=12, judge_net=dict(trained=False, reason="the training split has no class labels"))
  md = "\n".join(report._judges_section({"synthetic": row}, info))
  assert "No judge net (the training split has no class labels)" in md
  assert "| synthetic | 0.500 | 0.610 | - | - | - | - | - | - | 0.900 | 0.800 |" in md
  md = "\n".join(report._judges_section({}, dict(n=3, skipped="n = 3 images per set")))
  assert "Skipped: n = 3 images per set." in md and "| set |" not in md
