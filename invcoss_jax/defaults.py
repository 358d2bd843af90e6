"""The base configuration: every section's defaults, composed from the code that reads them."""

from __future__ import annotations

import os

import ml_collections

from invcoss_jax.audit.config import audit_config
from invcoss_jax.continual.config import continual_config
from invcoss_jax.data.config import data_config, shared_data_dir
from invcoss_jax.evaluate.config import evaluate_config
from invcoss_jax.interop.config import interop_config
from invcoss_jax.inversion.config import inversion_config
from invcoss_jax.models.presets import demo_model_config, model_config

from invcoss_jax.parallel.config import compile_config, mesh_config
from invcoss_jax.privacy.config import privacy_config
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
  c.compile = compile_config()  # ahead-of-time planning (`mode=compile`)
  c.privacy = privacy_config()  # differentially private training (off: target_epsilon = inf); docs/privacy.md
  c.init_from = ""  # workdir of a trained stage (its checkpoint and statistics)
  c.init_from_torch = ""  # a PyTorch MAE/timm/MedCoSS state dict to start from
  # A workdir holding another run (mode, modality, model, sequence, task: workdir.json) is refused; True
  # deletes that run first. A run restarted on its own workdir resumes either way.
  c.overwrite_workdir = False
  # The entry point prints an error the user can fix as one line (`error: ...`); True keeps its traceback
  # (as the environment variable INVCOSS_DEBUG=1 does). Changes nothing a run computes.
  c.debug = False
  return c


def pretrain_stage_config(*, modality: str, data_format: str, data_path: str, **data) -> ml_collections.ConfigDict:
  """One pre-training stage on the user's files with the paper's hyper-parameters (Sec. 4.1), which are the
  base config's (`model_config('base')`, `train.config.train_config`: ViT-B MAE, global batch 512, 300
  epochs, base lr 1.5e-4 scaled by batch/256, 40 warm-up epochs then cosine, mask 0.75)."""
  c = base_config()
  c.mode = "pretrain"
  c.data.name = "folder"
  c.data.format = data_format
  c.data.path = data_path
  c.data.modality = modality
  c.data.update(data)
  return c


def use_indiana_reports(d: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A data section on the Indiana chest X-ray reports of ../shared/data (not embedded in the package), with
  the normal-vs-abnormal labels of its `Problems` column; its 25 reports without findings or impression are
  skipped and counted (lenient)."""
  d.name, d.format, d.modality = "indiana_reports", "text", "report"
  d.path = os.path.join(shared_data_dir(), "report", "indiana_reports.csv")
  d.text.label_column, d.text.label_rule = "Problems", "normal_vs_abnormal"
  d.lenient = True
  return d


def use_demo_data(c: ml_collections.ConfigDict, name: str, *, global_batch_size: int,
                  **data) -> ml_collections.ConfigDict:
  """Switches a stage config to an embedded demo dataset and the demo micro model: peak lr 1.5e-3, 200 steps,
  a checkpoint and an image grid every 100 steps, so a 2-core CPU shows the loss falling in minutes."""
  c.data.name = name
  c.data.format = ""
  c.data.path = ""
  c.data.update(data)
  c.model = demo_model_config()
  c.train.global_batch_size = global_batch_size
  c.train.base_lr = 1.5e-3 * 256 / global_batch_size
  c.total_steps = 200
  c.checkpoint.every_steps = 100
  c.logging.log_every_steps = 10
  c.logging.image_every_steps = 100
  return c


def load_config_file(spec: str, *, search_dirs: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads a config file the way `--config=` does, for notebooks and tests.

  `spec` is `path/to/file.py[:preset]`; a relative path is looked up in the working directory, then in
  `search_dirs`, then next to the package (a source checkout's `configs/`).
  """
  import importlib.util
  import os

  path, _, arg = spec.partition(":")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidates = [path] + [os.path.join(d, path) for d in (*search_dirs, repo)]
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise FileNotFoundError(f"config file {path!r} not found (looked in: {', '.join(candidates)})")
  name = "invcoss_config_" + os.path.splitext(os.path.basename(found))[0]
  module_spec = importlib.util.spec_from_file_location(name, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
