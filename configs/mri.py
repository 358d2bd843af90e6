r"""Stage: brain MRI pre-training (ADNI in the paper).

  python -m invcoss_jax.main --config=configs/mri.py --workdir=workdirs/mri
  python -m invcoss_jax.main --config=configs/mri.py:demo   # embedded demo data, CPU, minutes

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B MAE with 16^3 patches on 16x192x192 windows,
global batch 512, 300 epochs, base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine.
"""

from invcoss_jax.defaults import pretrain_stage_config, use_demo_data


def get_config(arg=None):
  # Your NIfTI copy of ADNI (in-plane resize, 16-slice windows, percentile clip, z-scored per window).
  c = pretrain_stage_config(modality="mri", data_format="nifti", data_path="./data/adni", volume_shape=(16, 192, 192))
  if arg == "demo":
    # Embedded demo brain MRI, 16x32x32 windows (32 tokens).
    use_demo_data(c, "demo_mri", global_batch_size=16, volume_shape=(16, 32, 32))
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
