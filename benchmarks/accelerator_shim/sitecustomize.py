"""Put on PYTHONPATH by benchmarks/accelerator_check.py only where TensorFlow is not installed (the GPU machine's
image has none, and TensorFlow is too large to carry there), so that its child processes (pytest, the retention
run, and their own children) import `clu.metric_writers` at all: clu imports TensorFlow for its TensorBoard
writer. `install` replaces that one module, `clu.metric_writers.summary_writer`, by clu's own PyTorch TensorBoard
writer (real event files through torch.utils.tensorboard), or by a writer that drops the values where torch is
absent too. Nothing else changes, and the sitecustomize that this file hides, if any, still runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

MODULE = "clu.metric_writers.summary_writer"


def needed() -> bool:
  """True where TensorFlow is missing (clu's TensorBoard writer cannot be imported)."""
  if os.environ.get("INVCOSS_FORCE_CLU_SHIM") == "1":  # tests: exercise the shim where TensorFlow exists
    return True
  return importlib.util.find_spec("tensorflow") is None


class SummaryWriter:
  """clu's SummaryWriter without TensorFlow: `SummaryWriter(logdir)` returns clu's TorchTensorboardWriter (same
  interface), or a writer that keeps nothing where torch is not installed either."""

  def __new__(cls, logdir: str):
    try:
      from clu.metric_writers.torch_tensorboard_writer import TorchTensorboardWriter
      return TorchTensorboardWriter(logdir)
    except ImportError:
      from clu.metric_writers import interface

      class NullWriter(interface.MetricWriter):
        def write_summaries(self, step, values, metadata=None):
          pass

        def write_scalars(self, step, scalars):
          pass

        def write_images(self, step, images):
          pass

        def write_videos(self, step, videos):
          pass

        def write_audios(self, step, audios, *, sample_rate):
          pass

        def write_texts(self, step, texts):
          pass

        def write_histograms(self, step, arrays, num_buckets=None):
          pass

        def write_hparams(self, hparams):
          pass

        def flush(self):
          pass

        def close(self):
          pass

      return NullWriter()


def install() -> bool:
  """Registers the replacement before clu is imported; returns whether it did."""
  if MODULE in sys.modules or not needed():
    return False
  mod = types.ModuleType(MODULE, __doc__)
  mod.SummaryWriter = SummaryWriter
  sys.modules[MODULE] = mod
  return True


def _run_hidden_sitecustomize() -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  for p in sys.path:
    if not p or os.path.abspath(p) == here:
      continue
    f = os.path.join(p, "sitecustomize.py")
    if os.path.isfile(f):
      spec = importlib.util.spec_from_file_location("_hidden_sitecustomize", f)
      if spec and spec.loader:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
      return


if __name__ == "sitecustomize":
  _run_hidden_sitecustomize()
  install()
