r"""The retention benchmark: does a continual method keep what earlier stages learnt? (docs/results.md)

  python -m invcoss_jax.main --config=configs/retention.py:quick --workdir=workdirs/retention_quick
  python -m invcoss_jax.main --config=configs/retention.py:full --workdir=workdirs/retention_full
  python -m invcoss_jax.main --config=configs/retention.py:quick --config.retention.methods="('seqssl','invcoss')" ...

Presets:
- `quick`: X-ray (full PneumoniaMNIST, 4,708 training images) then pathology (709 H&E tiles of two slides);
  seqssl, er, invcoss; 4 seeds; a micro ViT on 32x32 images, 3000 steps of batch 64 per stage. About 21 minutes
  on a 2-core CPU.
- `full`: the four image modalities (X-ray, the embedded CT, hippocampus MRI, pathology); seqssl, er, medcoss,
  ewc, invcoss and joint (the upper bound: one stage over every modality); 3 seeds. CT and MRI have no class
  labels here: they are measured by drift (CKA) and replay quality only. 3000 X-ray steps, then 1500 per stage
  (`continual.stage_steps`); resampled 3D windows are cached (`data.window_cache_size`). 97 minutes on a
  2-core CPU.
- `report`: the report stage (MLM on the Indiana reports, 600 steps) then X-ray (3000 steps): does the X-ray
  stage forget what the reports taught (normal vs abnormal report probes), and does the real text buffer
  (er: random, invcoss: MedCoSS's k-means, the documented exception to data-free replay) keep it? seqssl, er,
  invcoss; 4 seeds; one vocabulary for every run (`workdir/vocabulary/tokenizer.json`). 38 minutes on a 2-core
  CPU (partly shared with other jobs).
- `content`: X-ray (as `quick`) then grey MRI slices (`python scripts/build_mri_slices.py` writes them first),
  distillation 0.1; seqssl, er, noise, invcoss, cassle; 4 seeds: does what is replayed matter? 37 minutes on a
  2-core CPU shared with other jobs, plus 6 for the judges.
- `priors` (a modifier, e.g. `content,priors`): invcoss's inversion with the realism priors beyond the paper.
- `replay_mae` (a modifier, e.g. `content,priors,replay_mae`): the buffer also trained with the MAE loss, per
  sample, beside the distillation.
- `tiny`: the embedded demo corpus and a few steps: the machinery end to end, for tests.
Every option is a flag, e.g. `--config.total_steps=1000` (steps per stage) or `--config.retention.seeds="(0,1,2,3,4)"`.

The real data is read from ../shared/data next to the checkout, or $INVCOSS_SHARED_DATA; point
`--config.continual.datasets.<modality>.path` elsewhere to use your copy.
"""

import os

import ml_collections

from invcoss_jax.defaults import base_config, shared_data_dir, use_indiana_reports
from invcoss_jax.inversion.config import use_cpu_demo_schedule, use_realism_priors, use_subspace_prior
from invcoss_jax.models.presets import demo_model_config
from invcoss_jax.retention.config import retention_config


def _npz(d: ml_collections.ConfigDict, path: str, modality: str, **extra) -> None:
  d.name, d.format, d.path, d.modality = "folder", "npz", path, modality
  d.image_size = 32
  d.update(extra)


def _common(c: ml_collections.ConfigDict) -> None:
  """A micro ViT on 32x32 images and 16x32x32 volumes, trained long enough to beat a random encoder."""
  c.model = demo_model_config()
  c.train.global_batch_size = 64
  c.train.base_lr = 1.2e-2  # peak lr 3e-3 at batch 64 (6e-3 left 1 of 3 seeds below a random encoder)
  c.total_steps = 3000  # per stage
  c.checkpoint.every_steps = 1000
  c.checkpoint.async_save = False
  c.logging.log_every_steps = 500
  c.logging.image_every_steps = 0
  c.inversion.stats_batch_size = 256
  use_cpu_demo_schedule(c.inversion)
  c.continual.synthesize_last_stage = False  # nothing comes after the last stage
  c.continual.kmeans.batch_size = 256
  c.continual.ewc.fisher_num_examples = 256


def _quick(c: ml_collections.ConfigDict) -> None:
  root = shared_data_dir()
  c.continual.order = ("xray", "path")
  # Four seeds: seqssl's kNN forgetting (about 0.03 AUC, sd 0.015 over seeds) needs t(3) = 3.18 to clear zero;
  # with three, t(2) = 4.30 leaves it inside its interval (docs/results.md).
  c.retention.seeds = (0, 1, 2, 3)
  d = c.continual.datasets
  _npz(d.xray, os.path.join(root, "xray", "pneumoniamnist.npz"), "xray")
  # Two slides' tiles: split 0.7/0.1/0.2 within each slide; the slide of origin is the probe's label.
  _npz(d.path, os.path.join(root, "pathology", "he_tiles_64px.npz"), "path", split_fractions=(0.7, 0.1, 0.2))
  d.path.npz.label_key = "slide_id"


def _full(c: ml_collections.ConfigDict) -> None:
  _quick(c)
  root = shared_data_dir()
  c.continual.order = ("xray", "ct", "mri", "path")
  d = c.continual.datasets
  d.ct.name, d.ct.format, d.ct.path, d.ct.modality = "demo_ct", "", "", "ct"
  d.ct.volume_shape = (16, 32, 32)
  d.ct.split_by, d.ct.split_fractions = "depth", (0.6, 0.2, 0.2)
  d.ct.ct.window_stride = 4  # one CT: overlapping windows within each depth slab (15 -> 45 training windows)
  # Every resampled window kept (64 KiB each at 16x32x32): the 3D stages are otherwise bound by resampling
  # each window per example (MRI 6.4 vs 142 batches/s of 64, CT 18 vs 60; benchmarks/input_pipeline.py).
  d.mri.name, d.mri.format, d.mri.modality = "folder", "nifti", "mri"
  d.mri.path = os.path.join(root, "mri", "hippocampus", "images")
  d.mri.volume_shape = (16, 32, 32)
  d.mri.split_fractions = (0.6, 0.2, 0.2)
  for m in (d.ct, d.mri):
    m.window_cache_size = 4096
    m.volume_cache_size = 8
  # X-ray as long as in `quick` (it must beat a random encoder); the three later stages half as long: 4,500
  # steps after X-ray, 1.5x quick's, so that forgetting is larger, and 6 methods x 3 seeds fit 2 hours.
  c.continual.stage_steps = (3000, 1500, 1500, 1500)
  c.retention.methods = ("seqssl", "er", "medcoss", "ewc", "invcoss", "joint")
  c.retention.seeds = (0, 1, 2)


def _report(c: ml_collections.ConfigDict) -> None:
  _quick(c)
  c.continual.order = ("report", "xray")
  d = use_indiana_reports(c.continual.datasets.report)  # with the probes' labels
  d.text.vocab_size = 2000  # the corpus has about 4,000 distinct words; the MLM head dominates a CPU step
  d.text.max_length = 112
  c.continual.stage_steps = (600, 3000)
  c.retention.methods = ("seqssl", "er", "invcoss")
  c.retention.seeds = (0, 1, 2, 3)


def mri_slices_path() -> str:
  """The grey MRI slices of `content` (scripts/build_mri_slices.py writes them; $INVCOSS_MRI_SLICES elsewhere)."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.environ.get("INVCOSS_MRI_SLICES", os.path.join(here, "workdirs", "data", "hippocampus_slices_32.npz"))


def _content(c: ml_collections.ConfigDict) -> None:
  """A regime where what is replayed can matter: X-ray, then a grey stage in the X-ray's input range.

  Pathology's colour tiles leave the grey X-ray features mostly alone (quick: every replay, noise included,
  keeps the stage). Brain-MRI slices are grey like the X-rays (one channel replicated to three), so the second
  stage rewrites the features X-rays use, and only replay that looks like X-rays pins them where X-rays lie.
  Distillation at a tenth of the paper's weight, so that replay does not keep the stage by freezing the trunk.
  """
  _quick(c)
  c.continual.order = ("xray", "mri")
  d = c.continual.datasets.mri
  _npz(d, mri_slices_path(), "xray")  # grey 2D slices, fed like X-rays: 3 equal channels
  c.continual.stage_steps = (3000, 1500)
  c.continual.distill_weight = 0.1
  c.retention.methods = ("seqssl", "er", "noise", "invcoss", "cassle")
  c.retention.seeds = (0, 1, 2, 3)


def _priors(c: ml_collections.ConfigDict) -> None:
  """invcoss's inversion with the realism priors beyond the paper (`inversion.config.use_realism_priors`) and a
  longer CPU schedule (4 batches of 64 images, 200 steps each, for a 235-image set); combine with a preset:
  `content,priors`. The noise control is unchanged by it (its generator is never optimised)."""
  use_realism_priors(c.inversion)
  s = c.inversion.schedule_2d
  s.batch_size, s.steps, s.init_steps = 64, 200, 200


def _subspace(c: ml_collections.ConfigDict) -> None:
  """The principal-subspace prior (`inversion.config.use_subspace_prior`) on top of the realism priors: a
  modifier, `content,priors,subspace`."""
  use_subspace_prior(c.inversion)


def _replay_mae(c: ml_collections.ConfigDict) -> None:
  """Replay also trains the MAE loss on the buffer, each buffer image weighing about as much as a current one
  (5 of 64 per step), beside the distillation (a modifier, e.g. `content,priors,replay_mae`): the setting in
  which real and inverted X-rays keep more than noise replay on the re-fitted decoder's error
  (docs/results.md, `content` item 6)."""
  c.continual.buffer_mae_weight = 0.078


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Embedded demo data (X-ray with labels, unlabelled pathology tiles), a 2-block ViT, a few steps."""
  c.continual.order = ("xray", "path")
  for m in ("xray", "path"):
    d = c.continual.datasets[m]
    d.name, d.format, d.path = f"demo_{m}", "", ""
    d.image_size = 16
  c.continual.datasets.path.split_fractions = (0.6, 0.2, 0.2)
  c.model.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
  c.train.global_batch_size = 16
  c.total_steps = 4
  c.checkpoint.every_steps = 2
  c.inversion.schedule_2d.batch_size = 8
  c.inversion.schedule_2d.steps = 2
  c.inversion.schedule_2d.init_steps = 2
  c.inversion.num_samples = 16
  c.retention.max_fit_examples = 128
  c.retention.max_test_examples = 128
  c.retention.feature_batch_size = 64
  c.retention.replay.max_nn_reference = 256
  c.retention.replay.grid_size = 4
  c.retention.knn_k = 5
  c.retention.recon.refit_steps = 5
  c.retention.recon.mask_draws = 2
  c.retention.replay.judges.folds = 2
  c.retention.replay.judges.cnn_steps = 10
  c.retention.replay.judges.judge_net_steps = 10


PRESETS = {"quick": _quick, "full": _full, "report": _report, "content": _content, "priors": _priors,
           "subspace": _subspace, "replay_mae": _replay_mae, "tiny": _tiny}


def get_config(arg=None):
  c = base_config()
  c.mode = "retention"
  c.retention = retention_config()
  _common(c)
  presets = [p.strip() for p in str(arg or "quick").split(",") if p.strip()]
  for p in presets:
    if p not in PRESETS:
      raise ValueError(f"configs/retention.py: unknown preset {p!r}; expected one of {sorted(PRESETS)}")
    PRESETS[p](c)
  return c
