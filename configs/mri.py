r"""Stage: brain MRI pre-training (ADNI in the paper).

  python -m invcoss_jax.main --config=configs/mri.py --workdir=workdirs/mri
  python -m invcoss_jax.main --config=configs/mri.py:demo   # embedded demo data, CPU, minutes

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B MAE with 16^3 patches on 16x192x192 windows,
global batch 512, 300 epochs, base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine.
"""

from invcoss_jax.defaults import base_config
from invcoss_jax.models.presets import model_config


def get_config(arg=None):
  c = base_config()
  c.mode = "pretrain"
  c.seed = 0
  c.model = model_config("base")

  # Your NIfTI copy of ADNI (in-plane resize, 16-slice windows, percentile clip, z-scored per window).
  c.data.name = "folder"
  c.data.format = "nifti"
  c.data.path = "./data/adni"
  c.data.modality = "mri"
  c.data.volume_shape = (16, 192, 192)

  c.train.global_batch_size = 512
  c.train.num_epochs = 300
  c.train.warmup_epochs = 40
  c.train.base_lr = 1.5e-4
  c.train.mask_ratio = 0.75

  if arg == "demo":
    # Embedded demo brain MRI, a micro ViT on 16x32x32 windows with 8^3 patches (32 tokens).
    c.data.name = "demo_mri"
    c.data.format = ""
    c.data.path = ""
    c.data.volume_shape = (16, 32, 32)
    c.model = model_config("micro")
    c.model.patch_size_2d = (8, 8)
    c.model.patch_size_3d = (8, 8, 8)
    c.train.global_batch_size = 16
    c.train.base_lr = 2.4e-2  # peak lr 1.5e-3 at batch 16
    c.total_steps = 200
    c.checkpoint.every_steps = 100
    c.logging.log_every_steps = 10
    c.logging.image_every_steps = 100
    # Inversion of the demo stage: 8 synthetic windows in 2 batches of 4; 60 steps for the fresh
    # generator, 30 for the second batch, which keeps it (re-initialised every 10 batches). A 4x
    # narrower InvUNet: 3D convolutions dominate the cost on a CPU.
    c.inversion.num_samples = 8
    c.inversion.invunet.channels = (4, 8, 16, 32, 64)
    c.inversion.schedule_3d.batch_size = 4
    c.inversion.schedule_3d.steps = 30
    c.inversion.schedule_3d.init_steps = 60
  elif arg:
    raise ValueError(f"configs/mri.py: unknown preset {arg!r}; expected nothing or 'demo'")
  return c
