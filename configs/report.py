r"""Stage: clinical report pre-training (MIMIC-CXR's free-text reports in the paper), masked language modelling.

  python -m invcoss_jax.main --config=configs/report.py --workdir=workdirs/report
  python -m invcoss_jax.main --config=configs/report.py:demo   # the Indiana reports in ../shared/data, CPU

Default: the paper's hyper-parameters (Sec. 4.1): ViT-B trunk, reports of up to 112 tokens (FINDINGS and
IMPRESSION of each MIMIC-CXR `files/pXX/pXXXXXXXX/sXXXXXXXX.txt`), whole-word masking of 15 % (MedCoSS), global
batch 512, 300 epochs, base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine, AdamW, wd 0.05. The
WordPiece vocabulary is trained on the stage's training reports into `<workdir>/tokenizer.json`, or read from
`--config.data.text.tokenizer=/path/to/vocab.txt` (e.g. Bio_ClinicalBERT's, as MedCoSS). Nothing is downloaded.

`demo` reads ../shared/data/report/indiana_reports.csv (3,851 de-identified chest X-ray reports, Open-i; or
$INVCOSS_SHARED_DATA/report/...). The reports are not embedded in the package: without ../shared, point
`--config.data.path` at your copy.
"""

import os

from invcoss_jax.defaults import shared_data_dir, pretrain_stage_config, use_demo_data


def get_config(arg=None):
  c = pretrain_stage_config(modality="report", data_format="text", data_path="./data/mimic_cxr_reports")
  c.data.text.max_length = 112
  if arg == "demo":
    # The micro trunk on the Indiana reports: 8,192-token WordPiece vocabulary trained on the training split.
    use_demo_data(c, "indiana_reports", global_batch_size=32,
                  path=os.path.join(shared_data_dir(), "report", "indiana_reports.csv"))
    c.data.lenient = True  # 25 reports have neither findings nor impression: skipped and counted
    c.logging.image_every_steps = 0
  elif arg:
    raise ValueError(f"configs/report.py: unknown preset {arg!r}; expected nothing or 'demo'")
  return c
