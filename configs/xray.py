r"""Stage: chest X-ray pre-training (MIMIC-CXR in the paper).

  python -m invcoss_jax.main --config=configs/xray.py --workdir=workdirs/xray
  python -m invcoss_jax.main --config=configs/xray.py:demo   # embedded demo data, CPU, minutes

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B/16 MAE, 224x224, global batch 512, 300 epochs,
base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine, AdamW (0.9, 0.95), wd 0.05.
"""

from invcoss_jax.defaults import base_config
from invcoss_jax.models.presets import model_config


def get_config(arg=None):
  c = base_config()
  c.mode = "pretrain"
  c.seed = 0
  c.model = model_config("base")

  # Your JPEG/PNG copy of MIMIC-CXR-JPG (grey, resized to 224 and replicated to 3 channels).
  c.data.name = "folder"
  c.data.format = "images"
  c.data.path = "./data/mimic_cxr_jpg"
  c.data.modality = "xray"
  c.data.image_size = 224

  c.train.global_batch_size = 512
  c.train.num_epochs = 300
  c.train.warmup_epochs = 40
  c.train.base_lr = 1.5e-4
  c.train.mask_ratio = 0.75

  if arg == "demo":
    # Embedded demo chest X-rays, a micro ViT on 32x32 images with 8x8 patches (16 tokens): a few
    # hundred steps on a 2-core CPU, the loss visibly falling.
    c.data.name = "demo_xray"
    c.data.format = ""
    c.data.path = ""
    c.data.image_size = 32
    c.model = model_config("micro")
    c.model.patch_size_2d = (8, 8)
    c.model.patch_size_3d = (8, 8, 8)
    c.train.global_batch_size = 32
    c.train.base_lr = 1.2e-2  # peak lr 1.5e-3 at batch 32
    c.total_steps = 200
    c.checkpoint.every_steps = 100
    c.logging.log_every_steps = 10
    c.logging.image_every_steps = 100
    # Inversion of the demo stage: 64 synthetic images in 2 batches of 32, 200 steps each.
    c.inversion.num_samples = 64
    c.inversion.schedule_2d.batch_size = 32
    c.inversion.schedule_2d.steps = 200
    c.inversion.schedule_2d.init_steps = 200
  elif arg:
    raise ValueError(f"configs/xray.py: unknown preset {arg!r}; expected nothing or 'demo'")
  return c
