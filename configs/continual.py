r"""Continual pre-training over the modality stages (paper Sec. 3.2, 4.1, App. B.1; Table 1's methods).

  python -m invcoss_jax.main --config=configs/continual.py --workdir=workdirs/invcoss
  python -m invcoss_jax.main --config=configs/continual.py --config.method=er --workdir=workdirs/er
  python -m invcoss_jax.main --config=configs/continual.py:demo --workdir=/tmp/continual_demo
  python -m invcoss_jax.main --config=configs/continual.py:demo,alt --config.method=medcoss --workdir=...
  python -m invcoss_jax.main --config=configs/continual.py:demo,report --workdir=/tmp/continual_report

Presets (comma-separated): `demo` (embedded demo data, micro ViT, the four image stages in minutes on a CPU:
the package embeds no reports), `report` (with `demo`: the report stage first, on the Indiana reports of
../shared/data; the paper's default already starts with it), `alt` (Table 5's alternative order Path., MRI,
Report, CT, X-ray; Path., MRI, CT, X-ray for the image-only demo), and a method name (e.g. `demo,er`).
`--config.continual.method` (on the command line also `--config.method`, its alias) picks the method: invcoss |
seqssl | er | medcoss | ewc | cassle | packnet | joint | noise, or any registered one
(invcoss_jax/continual/methods/). `--config.continual.buffer_fraction=0.01` (0.05, 0.10) sets the buffer size of
every buffer method (and of the synthetic sets). See docs/continual.md.

Default: the paper's setup, Report, X-ray, CT, MRI, pathology, each stage like its single-modality config
(configs/report.py, xray.py, ct.py, mri.py, path.py): ViT-B MAE, reports of 112 tokens, 224x224 2D and
16x192x192 3D inputs, global batch 512, 300 epochs per stage, base lr 1.5e-4 x batch/256, 40 warm-up epochs
then cosine, a 5 % buffer. The report stage cannot be inverted: invcoss keeps a real k-means text buffer of it
(5 %, clusters 1 %), the one documented exception (docs/continual.md).
"""

import ml_collections

from invcoss_jax.continual import methods
from invcoss_jax.continual.config import IMAGE_ALTERNATIVE_ORDER, IMAGE_ORDER, PAPER_ALTERNATIVE_ORDER, PAPER_ORDER
from invcoss_jax.defaults import base_config, use_indiana_reports
from invcoss_jax.inversion.config import use_cpu_demo_schedule
from invcoss_jax.models.presets import demo_model_config


def _paper_datasets(c: ml_collections.ConfigDict) -> None:
  """Your copies of the paper's corpora (see configs/<modality>.py for their preprocessing)."""
  d = c.continual.datasets
  d.report.name, d.report.format, d.report.path = "folder", "text", "./data/mimic_cxr_reports"
  d.report.text.max_length = 112
  d.xray.name, d.xray.format, d.xray.path = "folder", "images", "./data/mimic_cxr_jpg"
  d.xray.image_size = 224
  d.ct.name, d.ct.format, d.ct.path = "folder", "nifti", "./data/deeplesion"
  d.ct.volume_shape = (16, 192, 192)
  d.mri.name, d.mri.format, d.mri.path = "folder", "nifti", "./data/adni"
  d.mri.volume_shape = (16, 192, 192)
  d.path.name, d.path.format, d.path.path = "folder", "wsi", "./data/tcga"
  d.path.image_size = 224


def _demo(c: ml_collections.ConfigDict) -> None:
  """Embedded demo data; a micro ViT on 32x32 images and 16x32x32 volumes with 8-pixel patches."""
  for m in c.continual.datasets:
    d = c.continual.datasets[m]
    if m == "report":
      continue  # not embedded: `_demo_reports`
    d.name, d.format, d.path = f"demo_{m}", "", ""
    d.image_size = 32
    d.volume_shape = (16, 32, 32)
  c.model = demo_model_config()
  c.train.global_batch_size = 16
  c.train.base_lr = 2.4e-2  # peak lr 1.5e-3 at batch 16
  c.total_steps = 60  # per stage
  c.checkpoint.every_steps = 30
  c.checkpoint.async_save = False
  c.logging.log_every_steps = 10
  c.logging.image_every_steps = 0
  c.inversion.stats_batch_size = 32
  use_cpu_demo_schedule(c.inversion)
  c.continual.kmeans.batch_size = 32
  c.continual.ewc.fisher_num_examples = 32
  c.continual.cassle.hidden_dim = 128


def _demo_reports(c: ml_collections.ConfigDict) -> None:
  """The Indiana reports (../shared/data/report, or $INVCOSS_SHARED_DATA) as the demo's report stage; with
  labels, so the stage's held-out split also serves the normal-vs-abnormal probe."""
  use_indiana_reports(c.continual.datasets.report)


def get_config(arg=None):
  c = base_config()  # the paper's hyper-parameters (train/config.py, models/presets.py): every stage's
  c.mode = "continual"
  _paper_datasets(c)

  presets = [p.strip() for p in str(arg or "").split(",") if p.strip()]
  method = "invcoss"
  known = methods.names()  # every registered method (their modules are not imported)
  for p in presets:
    if p not in ("demo", "alt", "report") and p not in known:
      raise ValueError(f"configs/continual.py: unknown preset {p!r}; expected 'demo', 'report', 'alt' or a "
                       f"method ({', '.join(known)}), comma-separated")
    if p in known:
      method = p
  if "demo" in presets:
    _demo(c)
    if "report" in presets:
      _demo_reports(c)
  with_reports = "demo" not in presets or "report" in presets
  if "alt" in presets:
    c.continual.order = PAPER_ALTERNATIVE_ORDER if with_reports else IMAGE_ALTERNATIVE_ORDER
  else:
    c.continual.order = PAPER_ORDER if with_reports else IMAGE_ORDER
  c.continual.method = method  # `--config.method=er` is an alias of --config.continual.method=er (config_checks)
  return c
