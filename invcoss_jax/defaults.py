"""The base configuration: every section's defaults, composed from the code that reads them."""

from __future__ import annotations

import ml_collections

from invcoss_jax.audit.config import audit_config
from invcoss_jax.continual.config import continual_config
from invcoss_jax.data.config import data_config
from invcoss_jax.evaluate.config import evaluate_config
from invcoss_jax.interop.config import interop_config
from invcoss_jax.inversion.config import inversion_config
from invcoss_jax.models.presets import model_config
from invcoss_jax.parallel.config import mesh_config
from invcoss_jax.train.config import checkpoint_config, logging_config, train_config


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"  # pretrain | stats | invert | continual | evaluate | forgetting | compile | audit | ...
  c.seed = 0  # seeds every random stream (init, masking, drop-path, data order, augmentation)
  c.total_steps = -1  # > 0 caps any run; -1 derives the length from train.num_epochs
  c.model = model_config("base")
  c.data = data_config()
  c.train = train_config()
  c.mesh = mesh_config()
  c.checkpoint = checkpoint_config()
  c.logging = logging_config()
  c.inversion = inversion_config()
  c.continual = continual_config()
  c.evaluate = evaluate_config()
  c.audit = audit_config()
  c.interop = interop_config()
  c.init_from = ""  # workdir of a trained stage (its checkpoint and statistics)
  c.init_from_torch = ""  # a PyTorch MAE/timm/MedCoSS state dict to start from
  return c
