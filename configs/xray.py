r"""Stage: chest X-ray pre-training (MIMIC-CXR in the paper).

  python -m invcoss_jax.main --config=configs/xray.py --workdir=workdirs/xray
  python -m invcoss_jax.main --config=configs/xray.py:demo   # embedded demo data, CPU, minutes

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B/16 MAE, 224x224, global batch 512, 300 epochs,
base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine, AdamW (0.9, 0.95), wd 0.05.
"""

from invcoss_jax.defaults import pretrain_stage_config, use_demo_data


def get_config(arg=None):
  # Your JPEG/PNG copy of MIMIC-CXR-JPG (grey, resized to 224 and replicated to 3 channels).
  c = pretrain_stage_config(modality="xray", data_format="images", data_path="./data/mimic_cxr_jpg", image_size=224)
  if arg == "demo":
    # Embedded demo chest X-rays at 32x32 (16 tokens): the loss visibly falls within 200 steps.
    use_demo_data(c, "demo_xray", global_batch_size=32, image_size=32)
    # Inversion of the demo stage: 64 synthetic images in 2 batches of 32, 200 steps each.
    c.inversion.num_samples = 64
    c.inversion.schedule_2d.batch_size = 32
    c.inversion.schedule_2d.steps = 200
    c.inversion.schedule_2d.init_steps = 200
  elif arg:
    raise ValueError(f"configs/xray.py: unknown preset {arg!r}; expected nothing or 'demo'")
  return c
