"""Defaults of `config.evaluate` and the downstream task definitions.

`config.evaluate.task` names the task fine-tuned by `mode='evaluate'`; its settings are
`config.evaluate.tasks[<name>]` when present, else `task_config(<name>)`. Presets in
`configs/evaluate.py` put the tasks they use into `config.evaluate.tasks`, so every option can be
overridden from the command line (`--config.evaluate.tasks.chestxr.data.path=/data/chestxr`).

Paper tasks follow MedCoSS's downstream settings (../shared/notes/medcoss_facts.md); their data
paths are empty and must be set by the user. Demo tasks read the embedded demo corpus.
"""

from __future__ import annotations

import os

import ml_collections

from invcoss_jax.config_checks import ConfigError
from invcoss_jax.data.config import data_config, shared_data_dir

CLASSIFICATION, SEGMENTATION = "classification", "segmentation"
DEMO_TASKS = ("pneumonia", "hippocampus", "ct_organs", "indiana_abnormal")
PAPER_TASKS = ("pubmed20k", "chestxr", "qata", "ricord", "lits", "vs", "la", "nch", "glas")
# Table 1 column titles of the paper's tasks.
DISPLAY_NAMES = {"pubmed20k": "PubMed20k", "indiana_abnormal": "Indiana abnormal", "chestxr": "ChestXR", "qata": "QaTa", "ricord": "RICORD", "lits": "LiTS", "vs": "VS",
                 "la": "LA", "nch": "NCH", "glas": "GlaS", "pneumonia": "Pneumonia",
                 "hippocampus": "Hippocampus", "ct_organs": "CT organs"}


def evaluate_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pneumonia"  # the task of mode='evaluate' (a key of `tasks` or of task_config)
  c.tasks = ml_collections.ConfigDict()  # task name -> task_config(name), overridable
  c.protocol = "finetune"  # finetune (every weight trains) | linear (frozen encoder, linear probe)
  c.seeds = (0, 10, 100)  # one fine-tuning run per seed; reports give mean and std over them
  c.method_name = ""  # row label of the Markdown table; '' = basename of init_from, or 'TFS'
  c.drop_path = -1.0  # stochastic depth while fine-tuning; < 0 keeps the pre-trained model's value
  c.batch_shards = True  # split each batch over the mesh's batch axes (config.mesh)
  # Forgetting study (mode='forgetting'): every stage of each continual run on every task.
  c.forgetting = ml_collections.ConfigDict()
  c.forgetting.runs = ()  # 'Method=/path/to/continual_workdir' entries; () = ('InvCoSS=' + init_from,)
  c.forgetting.tasks = ()  # task names; () = (task,)
  c.forgetting.metrics = ()  # metrics plotted per task, e.g. ('acc', 'auc'); () = ACC or DSC
  return c


def task_config(name: str) -> ml_collections.ConfigDict:
  """Settings of one downstream task (a copy; change it freely)."""
  if name not in TASK_BUILDERS:
    raise ConfigError(f"config.evaluate.task={name!r} is unknown: expected one of {sorted(TASK_BUILDERS)} "
                     "or an entry of config.evaluate.tasks")
  return TASK_BUILDERS[name]()


def _base(kind: str, num_classes: int, data_name: str, modality: str) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.kind = kind  # classification | segmentation
  # Classes of 'label' (classification) or of the 'mask' label map including background 0.
  t.num_classes = num_classes
  t.data = data_config()
  t.data.name = data_name
  t.data.modality = modality
  t.train_split, t.val_split, t.test_split = "train", "val", "test"
  # Optimisation (MedCoSS: AdamW, weight decay 1e-4, poly decay with power 0.9 to 0).
  t.batch_size = 32
  t.steps = -1  # optimiser steps; -1 = epochs x (train examples // batch_size)
  t.epochs = 100
  t.warmup_steps = 0
  t.lr = 1e-4
  t.weight_decay = 1e-4
  t.lr_power = 0.9
  t.b1, t.b2 = 0.9, 0.999
  # Model selection on the validation split, evaluated every `eval_every` steps and at the end
  # (-1 = once per epoch). Classification selects on acc + auc + f1 (MedCoSS), segmentation on Dice.
  t.eval_every = -1
  t.eval_batch_size = 32
  # Heads.
  t.mlp_dim = 0  # classification: > 0 adds a hidden GELU layer to LayerNorm + linear
  t.unetr_feature_size = 16
  t.unetr_blocks = ()  # 1-based encoder blocks feeding UNETR; () = evenly spaced (3, 6, 9, 12 for ViT-B/16)
  t.seg_loss = "dice_bce"  # dice_bce (sigmoid per foreground class, MedCoSS) | dice_ce (softmax)
  t.dice_smooth = 0.0  # metric: 0 -> 2|P&T|/(|P|+|T|) (1 if both empty, MedCoSS 2D); 1 -> MedCoSS 3D
  # Inference on images larger than the window: sliding window with Gaussian weighting.
  t.window = ()  # () = the training image shape; larger eval images are then tiled
  t.overlap = 0.5
  t.sigma_scale = 0.125
  t.tta_flips = False  # average over all flips of the spatial axes (MedCoSS tests with flip TTA)
  # 3D segmentation: validate and test on whole cases at their native grid (sliding window), not on
  # the training windows; needs NIfTI/DICOM volumes (invcoss_jax.data.make_case_source).
  t.eval_whole_cases = False
  t.spacing = ()  # voxel size (mm) for HD95 in mm when the batch carries no 'spacing'; () = 1 mm
  return t


def _pneumonia():
  t = _base(CLASSIFICATION, 2, "demo_pneumonia", "xray")
  t.data.image_size = 64
  t.batch_size, t.epochs, t.lr = 32, 5, 1e-4
  return t


def _hippocampus():
  t = _base(SEGMENTATION, 3, "demo_hippocampus", "mri")
  t.data.volume_mode = "whole"
  t.data.volume_shape = (32, 48, 32)
  t.data.mri.trim_fraction = 0.0  # keep every slice: labels reach the ends of these small crops
  t.batch_size, t.epochs, t.lr = 4, 20, 1e-4
  t.eval_batch_size = 4
  t.seg_loss = "dice_ce"
  t.dice_smooth = 1.0
  t.eval_whole_cases = True  # native 1 mm crops (31-43 x 40-59 x 24-47), tiled by the 32x48x32 window
  return t


def _ct_organs():
  t = _base(SEGMENTATION, 42, "demo_ct_organs", "ct")
  t.data.volume_shape = (16, 64, 64)
  t.batch_size, t.epochs, t.lr = 4, 20, 1e-4
  t.eval_batch_size = 4
  t.seg_loss = "dice_ce"
  # 41 organs, most absent from any one slab: an organ missing from both prediction and label
  # counts as correct (Dice 1, HD95 0) rather than as a failure.
  t.dice_smooth = 0.0
  return t


def _paper(kind, num_classes, modality, *, fmt, batch_size, epochs, lr, image_size=224,
           volume_shape=(64, 192, 192)):
  t = _base(kind, num_classes, "folder", modality)
  t.data.format = fmt
  t.data.path = ""  # required: the user's copy of the dataset
  t.data.image_size = image_size
  t.data.volume_shape = volume_shape
  t.batch_size, t.epochs, t.lr = batch_size, epochs, lr
  t.tta_flips = True
  return t


def _pubmed20k():  # sentence roles of RCT abstracts (5 classes), the PubMed RCT format: train/dev/test.txt
  t = _paper(CLASSIFICATION, 5, "report", fmt="text", batch_size=64, epochs=5, lr=2e-4)
  t.data.text.layout = "pubmed"
  t.data.text.max_length = 112
  t.mlp_dim = 768  # MedCoSS: LN, GELU MLP, classifier on the mean of all tokens
  t.tta_flips = False
  return t


def _indiana_abnormal():  # normal vs abnormal report, from the Problems column of the Indiana reports
  t = _base(CLASSIFICATION, 2, "indiana_reports", "report")
  t.data.path = os.path.join(shared_data_dir(), "report", "indiana_reports.csv")
  t.data.text.label_column = "Problems"
  t.data.text.label_rule = "normal_vs_abnormal"
  t.data.lenient = True  # 25 reports have no findings nor impression
  t.batch_size, t.epochs, t.lr = 32, 3, 2e-4
  t.eval_batch_size = 64
  return t


def _chestxr():  # COVID-19 / pneumonia / normal; ImageFolder layout with train/val/test folders
  t = _paper(CLASSIFICATION, 3, "xray", fmt="images", batch_size=32, epochs=80, lr=5e-5)
  t.data.class_subfolders = True
  return t


def _qata():  # COVID-19 infection segmentation, binary masks
  t = _paper(SEGMENTATION, 2, "xray", fmt="images", batch_size=16, epochs=100, lr=1e-4)
  t.window = (224, 224)
  t.sigma_scale = 0.25  # MedCoSS's QaTa evaluation uses sigma 1/4
  return t


def _ricord():  # COVID-19 positive / negative chest CT, LN + MLP head
  t = _paper(CLASSIFICATION, 2, "ct", fmt="nifti", batch_size=8, epochs=200, lr=1e-5)
  t.data.volume_mode = "whole"
  t.mlp_dim = 768
  return t


def _lits():  # liver (1) and tumour (2), sigmoid channels as MedCoSS
  t = _paper(SEGMENTATION, 3, "ct", fmt="nifti", batch_size=2, epochs=100, lr=1e-4)
  t.window = (64, 192, 192)
  t.dice_smooth = 1.0
  t.eval_whole_cases = True
  return t


def _vs():  # vestibular schwannoma, T1 contrast-enhanced MRI
  t = _paper(SEGMENTATION, 2, "mri", fmt="nifti", batch_size=2, epochs=100, lr=1e-4)
  t.window = (64, 192, 192)
  t.dice_smooth = 1.0
  t.eval_whole_cases = True
  return t


def _la():  # left atrium, gadolinium-enhanced MRI
  t = _paper(SEGMENTATION, 2, "mri", fmt="nifti", batch_size=2, epochs=80, lr=5e-5)
  t.window = (64, 192, 192)
  t.dice_smooth = 1.0
  t.eval_whole_cases = True
  return t


def _nch():  # NCT-CRC-HE-100K (train) / CRC-VAL-HE-7K (test), 9 tissue classes
  t = _paper(CLASSIFICATION, 9, "path", fmt="images", batch_size=32, epochs=10, lr=1e-4)
  t.data.class_subfolders = True
  return t


def _glas():  # gland segmentation, 512 x 512 H&E
  t = _paper(SEGMENTATION, 2, "path", fmt="images", batch_size=4, epochs=100, lr=1e-4, image_size=512)
  t.window = (512, 512)
  return t


TASK_BUILDERS = {
    "pneumonia": _pneumonia, "hippocampus": _hippocampus, "ct_organs": _ct_organs,
    "indiana_abnormal": _indiana_abnormal, "pubmed20k": _pubmed20k,
    "chestxr": _chestxr, "qata": _qata, "ricord": _ricord, "lits": _lits, "vs": _vs, "la": _la,
    "nch": _nch, "glas": _glas,
}
