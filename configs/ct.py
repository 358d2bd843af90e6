r"""Stage: CT pre-training (DeepLesion in the paper).

  python -m invcoss_jax.main --config=configs/ct.py --workdir=workdirs/ct
  python -m invcoss_jax.main --config=configs/ct.py:demo   # embedded demo data, CPU, minutes

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B MAE with 16^3 patches on 16x192x192 windows,
global batch 512, 300 epochs, base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine.
"""

from invcoss_jax.defaults import pretrain_stage_config, use_demo_data


def get_config(arg=None):
  # Your NIfTI copy of DeepLesion (HU clipped to [-1024, 1024] -> [-1, 1], 1 mm, 24-slice windows).
  c = pretrain_stage_config(modality="ct", data_format="nifti", data_path="./data/deeplesion", volume_shape=(16, 192, 192))
  if arg == "demo":
    # Embedded demo CT, 16x32x32 windows (32 tokens).
    use_demo_data(c, "demo_ct", global_batch_size=16, volume_shape=(16, 32, 32))
  elif arg:
    raise ValueError(f"configs/ct.py: unknown preset {arg!r}; expected nothing or 'demo'")
  return c
