r"""Stage: pathology pre-training (tiles of 7 TCGA projects in the paper).

  python -m invcoss_jax.main --config=configs/path.py --workdir=workdirs/path
  python -m invcoss_jax.main --config=configs/path.py:demo   # embedded demo data, CPU, minutes

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B/16 MAE, 224x224 RGB tiles, global batch 512,
300 epochs, base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine, AdamW, wd 0.05.
"""

from invcoss_jax.defaults import pretrain_stage_config, use_demo_data


def get_config(arg=None):
  # Your folder of H&E tiles cut from the TCGA slides (or format='wsi' on the .svs slides themselves).
  c = pretrain_stage_config(modality="path", data_format="images", data_path="./data/tcga_tiles", image_size=224)
  if arg == "demo":
    # Embedded demo H&E tiles at 32x32 (16 tokens).
    use_demo_data(c, "demo_path", global_batch_size=32, image_size=32)
  elif arg:
    raise ValueError(f"configs/path.py: unknown preset {arg!r}; expected nothing or 'demo'")
  return c
